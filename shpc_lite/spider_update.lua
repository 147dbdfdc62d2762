-- shpc-lite: Lmod's own spider, writing the spider cache name by name (see shpc_lite/index.py).
--
-- Run before Lmod's spider script:
--   lua5.3 -e 'dofile(os.getenv("SHPC_LITE_SPIDER_UPDATE"))' .../libexec/spider -o spiderT MPATH
-- With SHPC_LITE_SPIDER_NAMES (one a line) Lmod walks only those names below the MODULEPATH dir
-- SHPC_LITE_SPIDER_TOP (a name that is gone yields nothing); without it, all of them. Each
-- walked name's entry of spiderT[TOP] is written by Lmod's own serializer, at the indent it has in
-- the cache, to SHPC_LITE_SPIDER_BLOCKS as "B <name bytes> <text bytes>\n<name><text>";
-- stdout gets the cache with one placeholder entry where the names go (none when a full walk
-- found no module: then stdout is the whole cache), and the blocks file ends
-- with "E 1\n" when the cache holds nothing but the names' entries (no module rc aliases, hidden
-- modules or MODULEPATH changes), "E 0\n" when it holds more. When only some names were walked,
-- the merge needs the first: otherwise exit status 3 (the caller walks the whole tree).
local lfs = require("lfs")
local top = os.getenv("SHPC_LITE_SPIDER_TOP")
local blocksFn = os.getenv("SHPC_LITE_SPIDER_BLOCKS")
local only = os.getenv("SHPC_LITE_SPIDER_NAMES")
local PLACEHOLDER = "shpc-lite: the names go here"

if only then
   local names = {}
   for name in only:gmatch("[^\n]+") do names[#names + 1] = name end
   local dir = lfs.dir
   lfs.dir = function(path)
      if path ~= top then return dir(path) end
      local i = 0
      return function() i = i + 1; return names[i] end
   end
end

local function empty(t) return type(t) == "table" and next(t) == nil end
local plain = true

package.preload["serializeTbl"] = function()
   package.preload["serializeTbl"] = nil
   dofile(package.searchpath("serializeTbl", package.path))
   local serialize = serializeTbl
   serializeTbl = function(t)
      if t.name == "mrcT" then
         local v = t.value
         plain = plain and empty(v.alias2modT) and empty(v.hiddenT) and empty(v.version2modT)
      elseif t.name == "mrcMpathT" then
         plain = plain and empty(t.value)
      elseif t.name == "spiderT" then
         local out = assert(io.open(blocksFn, "wb"))
         for name, entry in pairs(t.value[top] or {}) do
            -- serialized alone at its indent; it closes as an entry ("},"), not as a whole table
            local text = serialize{name = name, value = entry, indent = "    "}:gsub("}\n$", "},\n")
            out:write("B ", #name, " ", #text, "\n", name, text)
         end
         out:close()
         -- a full walk that found no module writes Lmod's own text (no place for names needed)
         if only or next(t.value[top] or {}) ~= nil then t.value[top] = {[PLACEHOLDER] = {}} end
      elseif t.name == "mpathMapT" then
         plain = plain and empty(t.value)
         local out = assert(io.open(blocksFn, "ab"))
         out:write("E ", plain and "1" or "0", "\n")
         out:close()
         if only and not plain then
            io.stderr:write("shpc-lite: the tree holds more than modules; walk all of it\n")
            os.exit(3)
         end
      end
      return serialize(t)
   end
   return true
end
