-- scripts/bench: fill a cache with <prefix>0 .. <prefix><count-1>, each requested once in
-- order, then stop (a few extra requests past the end wrap around to the first keys).
-- Args (after --): prefix, count, connections.

local prefix, count, slack = "/obj/1k/", 0, 64
local sent, received = 0, 0

function init(args)
  prefix = args[1]
  count = tonumber(args[2])
  slack = tonumber(args[3] or "64")
end

function request()
  local path = prefix .. (sent % count)
  sent = sent + 1
  return wrk.format("GET", path)
end

function response(status, headers, body)
  received = received + 1
  if received >= count + slack then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  io.write(string.format('BENCH-PRIMED {"requests": %d, "status_errors": %d}\n',
    summary.requests, summary.errors.status))
end
