-- The agent cycle (next-task, then complete) driven by wrk, an HTTP load generator that is
-- not agentq's: a second opinion on the bench's figures.
--
--   KEY=<admin or agent key> PROJECT=<project id or name> \
--     wrk -t1 -c64 -d10s -s examples/wrk/cycle.lua http://127.0.0.1:3000
--   wrk -t1 -c64 -d10s http://127.0.0.1:3000/health      # the ceiling, same connections
--
-- Fill the project's queue first (bulk creates; ~15,000 tasks per second of the run), and
-- start the server with --rate-limit-per-minute 0. wrk writes a connection's next request
-- when it can, not right after that connection's answer, so the requests cannot follow one
-- agent per connection: each next-task goes out under a fresh agent name, and its task,
-- token and name wait in a queue for the next request of any connection, which completes
-- it. Half the requests are next-tasks, half completes; the completes per second are the
-- cycles per second (read them from the project's `completedTasks`, before and after: wrk's
-- `done` runs in another Lua state and cannot see this one's counts).
local n = 0
local pending = {}
local head, tail = 1, 0
wrk.headers["X-API-Key"] = os.getenv("KEY")
wrk.headers["Content-Type"] = "application/json"
local project = os.getenv("PROJECT")

request = function()
  if tail >= head then
    local t = pending[head]
    pending[head] = nil
    head = head + 1
    return wrk.format("POST", "/api/tasks/" .. t[1] .. "/complete", nil,
      '{"agentName":"' .. t[3] .. '","leaseToken":"' .. t[2] .. '","result":"ok"}')
  end
  n = n + 1
  return wrk.format("POST", "/api/agents/w" .. n .. "/next-task", nil,
    '{"projectId":"' .. project .. '"}')
end

response = function(status, headers, body)
  local id = body:match('"task":{"id":"([^"]+)"')
  if id then
    tail = tail + 1
    pending[tail] = {id, body:match('"leaseToken":"([^"]+)"'), body:match('"assignedTo":"([^"]+)"')}
  end
end
