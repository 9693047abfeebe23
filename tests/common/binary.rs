//! The real binary as a test starts it: on a free port, with a known admin key, killed
//! when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const ADMIN_KEY: &str = "test-admin-key-for-the-binary";

pub fn agentq_bin() -> &'static str {
    env!("CARGO_BIN_EXE_agentq")
}

/// Starts the real binary on a free port and returns it (killed when dropped) with its base
/// URL.
pub fn start_binary(db: &std::path::Path) -> (Reaped, String) {
    let (mut cmd, base) = binary_command(Command::new(agentq_bin()), db);
    (Reaped(cmd.spawn().unwrap()), base)
}

/// `cmd` (the binary, or a shell that execs it) with the arguments of a server on `db` and a
/// free port, and the base URL.
pub fn binary_command(mut cmd: Command, db: &std::path::Path) -> (Command, String) {
    let port = free_port();
    cmd.args(["serve", "--db"])
        .arg(db)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args(["--admin-key", ADMIN_KEY, "--rate-limit-per-minute", "0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    (cmd, format!("http://127.0.0.1:{port}"))
}

/// A port nobody listens on now (the probe's socket is closed on return).
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

pub async fn wait_healthy(client: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server at {base} never became healthy");
}

/// Sends `signal` (`TERM`, `HUP`, ...) to a child process, with `kill`.
pub fn send(signal: &str, child: &Child) {
    Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
}

/// What a child wrote on `pipe` (its piped stdout or stderr), to its end.
pub fn read_all(pipe: Option<impl std::io::Read>) -> String {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut pipe.expect("a piped stream"), &mut text).unwrap();
    text
}

/// A child process killed when dropped, so a test that fails half way leaves no server
/// running behind it.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}
