-- scripts/bench: wrk reporting, shared by every workload.
-- Optional args (after --): a path prefix and a key count, to spread requests over
-- <prefix><i> for i in [0, count) at random (distinct cache keys); without them wrk
-- requests the URL it was given. done() prints one machine-readable line.

local prefix, count = nil, 0

function init(args)
  if args[1] ~= nil and args[2] ~= nil then
    prefix = args[1]
    count = tonumber(args[2])
    math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  end
end

function request()
  if prefix ~= nil then
    return wrk.format("GET", prefix .. math.random(0, count - 1))
  end
  return wrk.format()
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH-RESULT {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
