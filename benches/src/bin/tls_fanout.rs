//! W1 fan-out over TLS beside plain, in the same run: what TLS costs the server per delivery.
//!
//! One release server with one shard (pinned to CPU 0 with `taskset` when there are two or more
//! CPUs; the clients run on the others), N V2 subscribers on one topic and one publisher that
//! sends bursts of B broadcasts (100-byte payloads) every 100 ms for D seconds. The same load
//! runs plain and over TLS 1.3 (a CA made with the openssl CLI), alternated A B A B. Reported
//! per mode: deliveries counted by the subscribers, deliveries/s, and the server's CPU time
//! (utime + stime from /proc) per delivery; then the TLS/plain ratio of CPU per delivery. The
//! offered load stays below one core, so the CPU per delivery is the cost, not a saturation
//! artefact of the clients.
//!
//! Usage: `cargo run --release -p powa-benches --bin tls_fanout -- [N] [B] [D]` (default 1000
//! subscribers, 20 broadcasts per burst, 8 s). Loopback only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use powa_benches::driver::{binary, frame, token, SECRET};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};

trait Stream: Read + Write + Send + 'static {}
impl<T: Read + Write + Send + 'static> Stream for T {}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl").args(args).current_dir(dir).stderr(Stdio::null()).status().expect("openssl CLI");
    assert!(status.success(), "openssl {args:?}");
}

/// A CA and a `localhost` pair signed by it, in a fresh directory.
fn make_pki() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("powa-tls-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    openssl(&dir, &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(&dir, &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    openssl(&dir, &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf"]);
    dir
}

fn client_config(pki: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

fn start(tls: Option<&Path>) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut command = if cpus >= 2 {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(binary());
        c
    } else {
        Command::new(binary())
    };
    command
        .arg("serve")
        .env("JWT_SECRET", SECRET)
        .env("REALTIME_ADDR", format!("127.0.0.1:{port}"))
        .env("REALTIME_SHARDS", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(pki) = tls {
        command.env("REALTIME_TLS_CERT", pki.join("server.pem")).env("REALTIME_TLS_KEY", pki.join("server.key"));
    }
    let child = command.spawn().expect("start server");
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, port }
}

/// Pins the calling thread (and the threads it spawns afterwards) to every CPU but 0.
fn pin_clients() {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if cpus < 2 {
        return;
    }
    // SAFETY: a plain CPU set on the stack; sched_setaffinity only changes this thread.
    unsafe {
        let mut set: libc_cpu::cpu_set_t = std::mem::zeroed();
        for cpu in 1..cpus {
            libc_cpu::CPU_SET(cpu, &mut set);
        }
        libc_cpu::sched_setaffinity(0, std::mem::size_of::<libc_cpu::cpu_set_t>(), &set);
    }
}

mod libc_cpu {
    pub use libc::{cpu_set_t, sched_setaffinity, CPU_SET};
}

fn connect(port: u16, tls: Option<&Arc<rustls::ClientConfig>>, token: &str) -> Box<dyn Stream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut stream: Box<dyn Stream> = match tls {
        None => Box::new(tcp),
        Some(config) => {
            let conn = rustls::ClientConnection::new(Arc::clone(config), ServerName::try_from("localhost").unwrap().to_owned()).unwrap();
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
    };
    powa_benches::driver::upgrade(&mut *stream, token);
    stream
}

/// Reads frames, counting those that carry `marker`, until `stop` (a frame with `end`).
fn read_frames(stream: &mut dyn Stream, mut on_frame: impl FnMut(&[u8]) -> bool) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Parse complete frames.
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            if rest.len() < 2 {
                break;
            }
            let (len, header) = match rest[1] & 0x7F {
                126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
                127 if rest.len() >= 10 => (u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize, 10),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if rest.len() < header + len {
                break;
            }
            let payload = &rest[header..header + len];
            at += header + len;
            if !on_frame(payload) {
                return;
            }
        }
        buf.drain(..at);
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "server closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

struct Outcome {
    deliveries: u64,
    seconds: f64,
    cpu_seconds: f64,
}

fn run(label: &str, tls: Option<&Path>, subscribers: usize, burst: usize, duration: Duration) -> Outcome {
    let server = start(tls);
    let pid = server.child.id();
    let config = tls.map(client_config);
    let anon = token("anon", "bench");
    let topic = "realtime:tls-w1";
    let join = frame(&format!(r#"["1","1","{topic}","phx_join",{{"config":{{"broadcast":{{"self":false}}}}}}]"#));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    let ready = Arc::new(std::sync::Barrier::new(subscribers + 1));
    for _ in 0..subscribers {
        let mut stream = connect(server.port, config.as_ref(), &anon);
        stream.write_all(&join).unwrap();
        stream.flush().unwrap();
        let (delivered, ready) = (Arc::clone(&delivered), Arc::clone(&ready));
        readers.push(
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    // The join reply first.
                    read_frames(&mut *stream, |payload| !payload.windows(10).any(|w| w == b"phx_reply\""));
                    ready.wait();
                    let mut local = 0u64;
                    read_frames(&mut *stream, |payload| {
                        if payload.windows(4).any(|w| w == b"\"end") {
                            return false;
                        }
                        local += 1;
                        true
                    });
                    delivered.fetch_add(local, Ordering::Relaxed);
                })
                .unwrap(),
        );
    }
    ready.wait();
    let mut publisher = connect(server.port, config.as_ref(), &anon);
    publisher.write_all(&frame(&format!(r#"["9","9","{topic}","phx_join",{{"config":{{"broadcast":{{"self":false}}}}}}]"#))).unwrap();
    publisher.flush().unwrap();
    read_frames(&mut *publisher, |payload| !payload.windows(10).any(|w| w == b"phx_reply\""));
    let payload = "x".repeat(100);
    let message = frame(&format!(r#"["9",null,"{topic}","broadcast",{{"type":"broadcast","event":"tick","payload":{{"p":"{payload}"}}}}]"#));
    let mut burst_bytes = Vec::new();
    for _ in 0..burst {
        burst_bytes.extend_from_slice(&message);
    }
    let cpu_before = cpu_ticks(pid);
    let started = Instant::now();
    let mut next = started;
    let mut sent = 0u64;
    while started.elapsed() < duration {
        publisher.write_all(&burst_bytes).unwrap();
        publisher.flush().unwrap();
        sent += burst as u64;
        next += Duration::from_millis(100);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    publisher.write_all(&frame(&format!(r#"["9",null,"{topic}","broadcast",{{"type":"broadcast","event":"end","payload":{{}}}}]"#))).unwrap();
    publisher.flush().unwrap();
    for reader in readers {
        reader.join().unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_seconds = (cpu_ticks(pid) - cpu_before) as f64 / ticks;
    let deliveries = delivered.load(Ordering::Relaxed);
    assert_eq!(deliveries, sent * subscribers as u64, "{label}: lost deliveries");
    println!(
        "{label:5}  deliveries {deliveries:>9}  {:>9.0} deliveries/s  server CPU {cpu_seconds:>6.2} s  {:>6.0} ns CPU per delivery",
        deliveries as f64 / seconds,
        cpu_seconds * 1e9 / deliveries as f64
    );
    Outcome { deliveries, seconds, cpu_seconds }
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let subscribers = args.first().copied().unwrap_or(1000);
    let burst = args.get(1).copied().unwrap_or(20);
    let duration = Duration::from_secs(args.get(2).copied().unwrap_or(8) as u64);
    pin_clients();
    let pki = make_pki();
    println!("W1 plain vs TLS 1.3: {subscribers} subscribers, {burst} broadcasts of 100 B every 100 ms for {duration:?}, 1 shard");
    let mut plain = Vec::new();
    let mut tls = Vec::new();
    for _ in 0..2 {
        plain.push(run("plain", None, subscribers, burst, duration));
        tls.push(run("tls", Some(&pki), subscribers, burst, duration));
    }
    let per = |runs: &[Outcome]| runs.iter().map(|r| r.cpu_seconds).sum::<f64>() * 1e9 / runs.iter().map(|r| r.deliveries).sum::<u64>() as f64;
    let rate = |runs: &[Outcome]| runs.iter().map(|r| r.deliveries as f64 / r.seconds).sum::<f64>() / runs.len() as f64;
    let (p, t) = (per(&plain), per(&tls));
    println!("plain: {p:.0} ns CPU/delivery, {:.0} deliveries/s; TLS: {t:.0} ns CPU/delivery, {:.0} deliveries/s; TLS/plain CPU per delivery = {:.2}", rate(&plain), rate(&tls), t / p);
    let _ = std::fs::remove_dir_all(&pki);
}
