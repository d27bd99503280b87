-- The benchmark's requests for wrk (bench/wrk.py starts it; see there for why).
--
-- Set through the environment:
--   BENCH_GATEWAYS   host:port,host:port,...  thread n sends to gateway n mod count
--   BENCH_METHOD     GET or POST
--   BENCH_PATH       the path; "{id}" is replaced by a product id
--   BENCH_PRODUCTS   id,id,...  each thread takes them in turn (a POST holds one unit)
--   BENCH_STOP_AFTER after that many refusals (409) in a row a thread sends nothing more,
--                    and stops once every request it sent is answered (saying so on
--                    stdout: "BENCH_STOPPED"); 0: never
--   BENCH_HOLD_IDS   "1": keep the hold id of every 201, to count the distinct ones
-- done() prints one line, "BENCH_RESULT {json}", with the counts of every thread, and
-- the instants (CLOCK_MONOTONIC, microseconds) of the first request sent and of the last
-- answer of each status, so that a rate is taken, as the Python client takes it, from
-- the first request to the last answer it counts: a sellout's rate does not include the
-- refusals a thread waits for before it stops.

local ffi = require("ffi")  -- wrk runs LuaJIT; its Lua has no sub-second clock
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local clock = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, clock)  -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1000000 + math.floor(tonumber(clock.tv_nsec) / 1000)
end

local gateways, threads = {}, {}

function setup(thread)
  if #gateways == 0 then
    for host, port in string.gmatch(os.getenv("BENCH_GATEWAYS"), "([^,]+):(%d+)") do
      gateways[#gateways + 1] = wrk.lookup(host, port)[1]
    end
  end
  thread.addr = gateways[#threads % #gateways + 1]
  thread:set("first", #threads)
  threads[#threads + 1] = thread
end

local requests, turn, streak, stop_after, keep_ids = {}, 0, 0, 0, false
local sent, answered, stopping = 0, 0, false
statuses, hold_ids, last_us, first_us = {}, {}, {}, nil

function init(args)
  local method = os.getenv("BENCH_METHOD")
  local headers = nil
  if method == "POST" then headers = {["Content-Type"] = "application/json"} end
  for id in string.gmatch(os.getenv("BENCH_PRODUCTS"), "%d+") do
    local body = nil
    if method == "POST" then body = '{"product_id":' .. id .. ',"qty":1}' end
    local path = string.gsub(os.getenv("BENCH_PATH"), "{id}", id)
    requests[#requests + 1] = wrk.format(method, path, headers, body)
  end
  turn = first % #requests  -- threads start at different products
  stop_after = tonumber(os.getenv("BENCH_STOP_AFTER") or "0")
  keep_ids = os.getenv("BENCH_HOLD_IDS") == "1"
end

function request()
  if first_us == nil then first_us = now_us() end
  turn = turn % #requests + 1
  return requests[turn]
end

-- Defined only when a thread may stop early (wrk then asks it before every request):
-- a stopping thread's connections wait an hour, so it sends nothing more.
function stop_delay()
  if stopping then return 3600000 end
  sent = sent + 1  -- (counted here: wrk calls request() once more, to check it)
  return 0
end
if (os.getenv("BENCH_STOP_AFTER") or "0") ~= "0" then delay = stop_delay end

function response(status, headers, body)
  answered = answered + 1
  statuses[status] = (statuses[status] or 0) + 1
  last_us[status] = now_us()
  if status == 409 then
    streak = streak + 1
    if stop_after > 0 and streak >= stop_after then stopping = true end
  else
    streak = 0
    if keep_ids and status == 201 then
      local id = string.match(body, '"hold_id"%s*:%s*"([^"]+)"')
      if id then hold_ids[#hold_ids + 1] = id end
    end
  end
  if stopping and answered == sent then
    io.write("BENCH_STOPPED\n")  -- wrk runs on to its -d unless bench/wrk.py interrupts it
    io.flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local counts, seen, unique, kept, first, last = {}, {}, 0, 0, nil, {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
    local began = thread:get("first_us")
    if began ~= nil and (first == nil or began < first) then first = began end
    for status, at in pairs(thread:get("last_us")) do
      if last[status] == nil or at > last[status] then last[status] = at end
    end
    for _, id in ipairs(thread:get("hold_ids")) do
      kept = kept + 1
      if not seen[id] then
        seen[id] = true
        unique = unique + 1
      end
    end
  end
  local parts, ends = {}, {}
  for status, n in pairs(counts) do
    parts[#parts + 1] = string.format('"%d":%d', status, n)
  end
  for status, at in pairs(last) do
    ends[#ends + 1] = string.format('"%d":%d', status, at)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"duration_us":%d,"first_us":%d,"last_us":{%s},' ..
    '"requests":%d,"statuses":{%s},' ..
    '"hold_ids":%d,"unique_hold_ids":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},' ..
    '"latency_us":{"count":%d,"p50":%d,"p95":%d,"p99":%d,"max":%d}}\n',
    summary.duration, first or 0, table.concat(ends, ","),
    summary.requests, table.concat(parts, ","), kept, unique,
    e.connect, e.read, e.write, e.timeout, summary.requests,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
