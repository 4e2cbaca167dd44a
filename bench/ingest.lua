-- wrk script: distinct notifications (a mix of the six types, unique ids so
-- dedup does not collapse them), with Basic auth, over keep-alive.
-- wrk -t2 -c64 -d10s -s bench/ingest.lua http://127.0.0.1:8000/webhook/activity
local types = {"order_request", "order_cancelled", "order_completed",
               "order_revision_requested", "message", "documents"}
local counter = 0

local threads = {}

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Basic " .. (os.getenv("BENCH_AUTH") or "cXVhbGlhOmNoYW5nZS1tZS1ub3c=")
end

request = function()
  counter = counter + 1
  local t = types[(counter % 6) + 1]
  local order = string.format("bench%02d%010d", thread_id or 0, counter)
  local body
  if t == "message" then
    body = string.format('{"description":"Marty McFly sent you a message.","type":"message","order_id":"%s","message_id":"m%s"}', order, order)
  else
    body = string.format('{"description":"Boston Legal event %d","type":"%s","order_id":"%s"}', counter, t, order)
  end
  return wrk.format("POST", nil, nil, body)
end
