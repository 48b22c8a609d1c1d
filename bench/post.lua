-- wrk script for the kvsleep benchmarks: POST one JSON body, count what counts.
--
--   wrk -t T -c C -d D --latency -s bench/post.lua URL -- BODY COUNT_SSE
--
-- BODY is the JSON request body; COUNT_SSE is "1" to count SSE `data: ` events in 2xx answers.
-- Only 2xx answers count: a target that answers errors has no throughput. `done` prints one
-- line, `BENCH_RESULT {json}`, that bench/wrk.py parses (latencies in microseconds).

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.body = args[1]
  wrk.headers["Content-Type"] = "application/json"
  count_sse = args[2] == "1"
  ok2xx = 0
  non2xx = 0
  events = 0
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok2xx = ok2xx + 1
    if count_sse and body then
      local _, n = string.gsub(body, "data: ", "")
      events = events + n
    end
  else
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local ok, bad, ev = 0, 0, 0
  for _, thread in ipairs(threads) do
    ok = ok + thread:get("ok2xx")
    bad = bad + thread:get("non2xx")
    ev = ev + thread:get("events")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"duration_us": %d, "requests": %d, "ok2xx": %d, "non2xx": %d, '
      .. '"events": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, '
      .. '"timeout": %d}, "latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, '
      .. '"max": %d}}\n',
    summary.duration, summary.requests, ok, bad, ev, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
