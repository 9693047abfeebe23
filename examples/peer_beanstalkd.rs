//! The agent cycle against beanstalkd, a peer queue, with the same client shape as `bench`:
//! a single-threaded tokio runtime (one core), one connection per agent, agents looping
//! reserve → delete (beanstalkd's next-task → complete) until the queue is empty.
//!
//! ```sh
//! apt-get install beanstalkd
//! cargo run --release --example peer_beanstalkd -- [--agents 64] [--tasks 20000] [--fsync-ms 0]
//! ```
//!
//! It starts `beanstalkd` (from `PATH`) on a free port with its write-ahead log in a temporary
//! directory: `--fsync-ms 0` is beanstalkd's "always fsync" (`-f0`), its full durability;
//! `--fsync-ms N` syncs at most every N ms (its default is 50, which can lose the last 50 ms
//! of acknowledged writes); `--no-log` runs it in memory. It prints the figures `bench` prints
//! for the same phases: jobs put per second (4 connections, 1,000 puts pipelined per round
//! trip, as close as beanstalkd comes to a bulk create), cycles per second with next/complete
//! latencies, and the CPU each side spent per cycle. Only a reserve's delete is logged by
//! beanstalkd: a reservation itself is not durable (after a restart the job is ready again),
//! where agentq's claim is.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentq::telemetry::stat_cpu_seconds;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

#[derive(clap::Parser)]
#[command(name = "peer_beanstalkd")]
struct Opts {
    /// Agents looping reserve → delete, one connection each.
    #[arg(long, default_value_t = 64)]
    agents: usize,
    /// Jobs put, then drained by the agents.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// beanstalkd's `-f`: fsync at most every this many ms; 0 = after every write.
    #[arg(long, default_value_t = 0)]
    fsync_ms: u64,
    /// Run beanstalkd without its write-ahead log (in memory, nothing durable).
    #[arg(long)]
    no_log: bool,
}

struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    line: String,
}

impl Conn {
    async fn open(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).await.expect("beanstalkd accepts");
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        Conn {
            r: BufReader::new(r),
            w,
            line: String::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.unwrap();
    }

    async fn reply(&mut self) -> &str {
        self.line.clear();
        self.r.read_line(&mut self.line).await.unwrap();
        self.line.trim_end()
    }

    /// `reserve-with-timeout 0`: the id of a job now, or `None` when the queue is empty.
    async fn reserve(&mut self) -> Option<u64> {
        self.send(b"reserve-with-timeout 0\r\n").await;
        let reply = self.reply().await.to_string();
        let mut parts = reply.split(' ');
        match parts.next() {
            Some("RESERVED") => {
                let id = parts.next().unwrap().parse().unwrap();
                let len: usize = parts.next().unwrap().parse().unwrap();
                let mut body = vec![0u8; len + 2];
                self.r.read_exact(&mut body).await.unwrap();
                Some(id)
            }
            Some("TIMED_OUT") => None,
            _ => panic!("reserve: {reply}"),
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat_cpu_seconds(&stat).unwrap()
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let o: Opts = clap::Parser::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(o));
}

async fn run(o: Opts) {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new("beanstalkd");
    cmd.args(["-l", "127.0.0.1", "-p", &port.to_string()]);
    if !o.no_log {
        cmd.arg("-b")
            .arg(dir.path())
            .arg("-f")
            .arg(o.fsync_ms.to_string());
    }
    let server = Reaped(
        cmd.stdout(Stdio::null())
            .spawn()
            .expect("beanstalkd on PATH (apt-get install beanstalkd)"),
    );
    let pid = server.0.id().to_string();
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    while TcpStream::connect(&addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "beanstalkd did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let durability = match (o.no_log, o.fsync_ms) {
        (true, _) => "no log (in memory)".to_string(),
        (false, 0) => "write-ahead log, fsync after every write (-f0)".to_string(),
        (false, ms) => format!("write-ahead log, fsync at most every {ms} ms (-f{ms})"),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "beanstalkd peer bench: {} agents, {} jobs, {cores} cores, {durability}",
        o.agents, o.tasks
    );

    // Put the jobs: 4 connections, 1,000 puts pipelined per round trip.
    let body = br#"{"instructions":"bench task"}"#;
    let mut put = Vec::new();
    put.extend_from_slice(format!("put 1024 0 300 {}\r\n", body.len()).as_bytes());
    put.extend_from_slice(body);
    put.extend_from_slice(b"\r\n");
    let (cpu0, t0) = (cpu_seconds(&pid), Instant::now());
    let per = o.tasks.div_ceil(4);
    let mut putters = Vec::new();
    for i in 0..4 {
        let (addr, put) = (addr.clone(), put.clone());
        let n = per.min(o.tasks.saturating_sub(i * per));
        putters.push(tokio::spawn(async move {
            let mut c = Conn::open(&addr).await;
            let mut left = n;
            while left > 0 {
                let round = left.min(1000);
                c.send(&put.repeat(round)).await;
                for _ in 0..round {
                    let reply = c.reply().await;
                    assert!(reply.starts_with("INSERTED"), "put: {reply}");
                }
                left -= round;
            }
        }));
    }
    for p in putters {
        p.await.unwrap();
    }
    let put_secs = t0.elapsed().as_secs_f64();
    let put_cpu = cpu_seconds(&pid) - cpu0;
    println!(
        "put (1000 pipelined, 4 in flight):     {:.0} jobs/s",
        o.tasks as f64 / put_secs
    );
    println!(
        "  CPU per job: server {:.1} µs",
        put_cpu * 1e6 / o.tasks as f64
    );

    // The cycle.
    let me = std::process::id().to_string();
    let (cpu0, me0, t0) = (cpu_seconds(&pid), cpu_seconds(&me), Instant::now());
    let mut agents = Vec::new();
    for _ in 0..o.agents {
        let addr = addr.clone();
        agents.push(tokio::spawn(async move {
            let mut c = Conn::open(&addr).await;
            let (mut next, mut done) = (Vec::new(), Vec::new());
            loop {
                let t = Instant::now();
                let Some(id) = c.reserve().await else { break };
                next.push(t.elapsed().as_micros() as u32);
                let t = Instant::now();
                c.send(format!("delete {id}\r\n").as_bytes()).await;
                let reply = c.reply().await;
                assert_eq!(reply, "DELETED");
                done.push(t.elapsed().as_micros() as u32);
            }
            (next, done)
        }));
    }
    let (mut next, mut done) = (Vec::new(), Vec::new());
    for a in agents {
        let (n, d) = a.await.unwrap();
        next.extend(n);
        done.extend(d);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cycles = done.len();
    assert_eq!(cycles, o.tasks, "every job was reserved and deleted once");
    let server_us = (cpu_seconds(&pid) - cpu0) * 1e6 / cycles as f64;
    let client_us = (cpu_seconds(&me) - me0) * 1e6 / cycles as f64;
    next.sort_unstable();
    done.sort_unstable();
    println!(
        "agent cycle (reserve → delete):        {:.0} cycles/s",
        cycles as f64 / secs
    );
    println!(
        "  reserve  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        percentile(&next, 0.5),
        percentile(&next, 0.99),
        percentile(&next, 1.0)
    );
    println!(
        "  delete   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        percentile(&done, 0.5),
        percentile(&done, 0.99),
        percentile(&done, 1.0)
    );
    println!("  CPU per cycle: server {server_us:.0} µs, client {client_us:.0} µs");
    drop(server);
}
