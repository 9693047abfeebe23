#!/usr/bin/env python3
"""Long-pollers that give up at random moments, to count tasks leased to nobody listening.

    PORT=<port of a running agentq serve with --admin-key benchadminkey0123456789
          --rate-limit-per-minute 0> python3 examples/abandoned_polls.py

200 pollers loop: each asks next-task with `waitSeconds: 2` under a fresh agent name on a new
connection, waits 0-2.5 s for the answer (random), then closes the connection, whether or not
it came. Meanwhile tasks are created one at a time for 20 s. Pollers never complete what they
get, so at the end every task handed out is still running; one whose agent never saw its
answer is an orphan: leased to nobody listening until its lease expires.
"""
import os
import asyncio, json, random, time
import requests
PORT=int(os.environ.get("PORT", "3000")); B=f"http://127.0.0.1:{PORT}"; KEY="benchadminkey0123456789"
H={"X-API-Key":KEY,"content-type":"application/json"}
received=set(); stop=False; n=[0]
async def poller(i):
    while not stop:
        n[0]+=1; name=f"p{i}-{n[0]}"
        body=json.dumps({"projectId":"o","waitSeconds":2}).encode()
        try:
            r,w=await asyncio.open_connection("127.0.0.1",PORT)
        except Exception:
            await asyncio.sleep(0.1); continue
        w.write(b"POST /api/agents/%s/next-task HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (name.encode(),KEY.encode(),len(body)) + body)
        await w.drain()
        try:
            data=await asyncio.wait_for(r.read(65536), timeout=random.uniform(0.0,2.5))
            if b'"leaseToken"' in data: received.add(name)
        except asyncio.TimeoutError:
            pass
        w.close()
async def main():
    global stop
    s=requests.Session()
    s.post(B+"/api/projects",headers=H,json={"name":"o","description":"d"})
    tasks=[asyncio.create_task(poller(i)) for i in range(200)]
    loop=asyncio.get_running_loop()
    def produce():
        ss=requests.Session(); t0=time.time()
        while time.time()-t0<20:
            ss.post(B+"/api/projects/o/tasks",headers=H,json={"instructions":"x"}); time.sleep(0.003)
    await loop.run_in_executor(None, produce)
    stop=True
    await asyncio.sleep(3)
    for t in tasks: t.cancel()
    names=[]
    while True:
        d=s.get(B+f"/api/projects/o/agents?limit=1000&offset={len(names)}",headers=H).json()["data"]
        if not d: break
        names+=[a["agentName"] for a in d]
    orphans=[x for x in names if x not in received]
    st=s.get(B+"/api/projects/o/stats",headers=H).json()["data"]["project"]["stats"]
    print(f"pollers' requests {n[0]}, tasks handed out {st['runningTasks']}, seen by their client {len(names)-len(orphans)}, orphans (leased, never seen) {len(orphans)}")
asyncio.run(main())
