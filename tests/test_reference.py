"""Image reference parsing and normalisation (Docker's rules)."""

import pytest

from shpc_lite.errors import ReferenceError_
from shpc_lite.oci.reference import ImageReference, is_digest, parse_reference, validate_digest

D = "sha256:" + "0123456789abcdef" * 4
D2 = "sha256:" + "f" * 64

GOOD = [
    # text, registry, repository, tag, digest, canonical
    ("python", "docker.io", "library/python", "latest", None, "docker.io/library/python:latest"),
    ("python:3.11", "docker.io", "library/python", "3.11", None, "docker.io/library/python:3.11"),
    ("library/python:3.11-slim-bookworm", "docker.io", "library/python", "3.11-slim-bookworm",
     None, "docker.io/library/python:3.11-slim-bookworm"),
    ("docker.io/python:3.11", "docker.io", "library/python", "3.11", None,
     "docker.io/library/python:3.11"),
    ("index.docker.io/library/python:3.11", "docker.io", "library/python", "3.11", None,
     "docker.io/library/python:3.11"),
    ("index.docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None,
     "docker.io/library/ubuntu:latest"),
    ("pytorch/pytorch:2.2.1-cuda12.1-cudnn8-runtime", "docker.io", "pytorch/pytorch",
     "2.2.1-cuda12.1-cudnn8-runtime", None,
     "docker.io/pytorch/pytorch:2.2.1-cuda12.1-cudnn8-runtime"),
    ("tensorflow/tensorflow:2.15.0-gpu", "docker.io", "tensorflow/tensorflow", "2.15.0-gpu", None,
     "docker.io/tensorflow/tensorflow:2.15.0-gpu"),
    ("nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io", "nvidia/pytorch", "24.01-py3", None,
     "nvcr.io/nvidia/pytorch:24.01-py3"),
    ("NVCR.IO/nvidia/tensorflow:23.03-tf1-py3", "nvcr.io", "nvidia/tensorflow", "23.03-tf1-py3",
     None, "nvcr.io/nvidia/tensorflow:23.03-tf1-py3"),
    ("ghcr.io/apptainer/lolcow", "ghcr.io", "apptainer/lolcow", "latest", None,
     "ghcr.io/apptainer/lolcow:latest"),
    ("quay.io/biocontainers/samtools:1.19--h50ea8bc_0", "quay.io", "biocontainers/samtools",
     "1.19--h50ea8bc_0", None, "quay.io/biocontainers/samtools:1.19--h50ea8bc_0"),
    (f"localhost:5000/x/y@{D}", "localhost:5000", "x/y", None, D, f"localhost:5000/x/y@{D}"),
    ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
    ("127.0.0.1:5000/a/b/c:v1", "127.0.0.1:5000", "a/b/c", "v1", None,
     "127.0.0.1:5000/a/b/c:v1"),
    ("[::1]:5000/a:v1", "[::1]:5000", "a", "v1", None, "[::1]:5000/a:v1"),
    (f"python:3.11@{D}", "docker.io", "library/python", "3.11", D,
     f"docker.io/library/python:3.11@{D}"),
    (f"python@{D}", "docker.io", "library/python", None, D, f"docker.io/library/python@{D}"),
    ("a/b__c.d-e--f:T_ag.1-x", "docker.io", "a/b__c.d-e--f", "T_ag.1-x", None,
     "docker.io/a/b__c.d-e--f:T_ag.1-x"),
    ("docker://python:3.11", "docker.io", "library/python", "3.11", None,
     "docker.io/library/python:3.11"),
    ("  python:3.11\n", "docker.io", "library/python", "3.11", None,
     "docker.io/library/python:3.11"),
]


@pytest.mark.parametrize("text,registry,repository,tag,digest,canonical", GOOD)
def test_parse_good(text, registry, repository, tag, digest, canonical):
    ref = parse_reference(text)
    assert ref == ImageReference(registry, repository, tag, digest)
    assert str(ref) == canonical
    assert parse_reference(str(ref)) == ref  # canonical form round-trips


BAD = [
    ("", "empty"),
    ("Python:3.11", "lowercase"),
    ("nvcr.io/NVIDIA/pytorch", "lowercase"),
    ("python:", "invalid tag"),
    ("python:-x", "invalid tag"),
    ("python:" + "a" * 129, "invalid tag"),
    ("python@sha256:abc", "64"),
    ("python@sha256:" + "A" * 64, "64"),
    ("python@md5:" + "a" * 32, "unsupported"),
    ("python@" + "a" * 64, "ALGORITHM"),
    ("a" * 64, "image ID"),
    ("-python", "invalid repository"),
    ("py--/thon", "invalid repository"),
    ("a//b", "invalid repository"),
    ("a/b/", "invalid repository"),
    ("host:port/x", "invalid registry"),
    ("-host.io/x", "invalid registry"),
    ("python 3", "white space"),
    ("a:b:c", "invalid repository"),
    ("example.com/" + "a" * 250, "longer than 255"),
    ("/python", "invalid"),
]


@pytest.mark.parametrize("text,why", BAD)
def test_parse_bad(text, why):
    with pytest.raises(ReferenceError_) as info:
        parse_reference(text)
    message = str(info.value)
    assert "\n" not in message
    assert repr(text) in message  # names the reference
    assert why in message


def test_properties_and_helpers():
    ref = parse_reference("python:3.11")
    assert ref.api_host == "registry-1.docker.io"
    assert ref.name == "docker.io/library/python"
    assert ref.familiar == "python:3.11"
    assert ref.identifier == "3.11"
    pinned = ref.with_digest(D)
    assert str(pinned) == f"docker.io/library/python:3.11@{D}"
    assert pinned.identifier == D
    assert pinned.with_digest(D2).digest == D2
    retagged = pinned.with_tag("3.12")
    assert (retagged.tag, retagged.digest) == ("3.12", None)
    assert parse_reference("nvcr.io/nvidia/pytorch:24.01-py3").api_host == "nvcr.io"
    assert parse_reference("nvcr.io/nvidia/pytorch:24.01-py3").familiar == \
        "nvcr.io/nvidia/pytorch:24.01-py3"
    assert parse_reference("pytorch/pytorch").familiar == "pytorch/pytorch:latest"
    with pytest.raises(ReferenceError_):
        ref.with_digest("sha256:123")
    with pytest.raises(ReferenceError_):
        ref.with_tag("bad tag")
    with pytest.raises(Exception):
        ref.tag = "x"  # frozen


def test_digest_validation():
    assert validate_digest(D) == D
    assert is_digest("sha512:" + "a" * 128)
    for bad in ["sha256:" + "a" * 63, "sha256:" + "g" * 64, "sha256", ":" + "a" * 64,
                "sha256:../../etc/passwd", "SHA256:" + "a" * 64, None]:
        assert not is_digest(bad)
