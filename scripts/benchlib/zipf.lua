-- scripts/bench: the zipf and fill workloads (long tail, cold caches).
-- Args (after --):
--   RUN zipf KEYS_FILE SEED EXPONENT  requests drawn from the paths in KEYS_FILE (one per line, most
--                                     popular first) with popularity rank^-EXPONENT, from a PRNG
--                                     seeded with SEED: every system gets the same sequence.
--   RUN fill PREFIX                   PREFIX0, PREFIX1, ...: every request a key never asked before.
-- Each request carries "X-Bench: RUN N" (N counts from 1). A cache forwards it on a miss, and the
-- origin records it (bench_apps.py --record), so the misses among the first N requests are known
-- exactly without reading any answer here (a response() callback makes wrk copy every body: it
-- cost wrk ~40 % of its speed). The distinct keys asked after every STEP requests (what a cache
-- that keeps everything misses) go out with the usual BENCH-RESULT line.

local STEP = 1000
local run, mode = "", nil
local paths, cdf, n = {}, {}, 0
local prefix, counter = "", 0
local seen = {}
-- Globals, not locals: done() runs in wrk's main Lua state and reads them with thread:get().
requests, distinct = 0, 0
distinct_curve = {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  run, mode = args[1], args[2]
  if mode == "zipf" then
    for line in io.lines(args[3]) do
      n = n + 1
      paths[n] = line
    end
    math.randomseed(tonumber(args[4]))
    local s = tonumber(args[5])
    local total = 0
    for i = 1, n do
      total = total + i ^ (-s)
      cdf[i] = total
    end
    for i = 1, n do
      cdf[i] = cdf[i] / total
    end
  else
    prefix = args[3]
  end
end

function request()
  requests = requests + 1
  local path
  if mode == "zipf" then
    local u = math.random()
    local lo, hi = 1, n
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] < u then lo = mid + 1 else hi = mid end
    end
    path = paths[lo]
    if not seen[lo] then
      seen[lo] = true
      distinct = distinct + 1
    end
  else
    path = prefix .. counter
    counter = counter + 1
    distinct = distinct + 1
  end
  if requests % STEP == 0 then
    distinct_curve[#distinct_curve + 1] = distinct
  end
  return wrk.format("GET", path, {["X-Bench"] = run .. " " .. requests})
end

local function list(t)
  local parts = {}
  for i = 1, #t do parts[i] = tostring(t[i]) end
  return "[" .. table.concat(parts, ",") .. "]"
end

function done(summary, latency, requests)
  local e = summary.errors
  local t = threads[1]
  io.write(string.format(
    'BENCH-RESULT {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}, ' ..
    '"sent": %d, "distinct": %d, "step": %d, "distinct_curve": %s}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    t:get("requests"), t:get("distinct"), STEP, list(t:get("distinct_curve"))))
end
