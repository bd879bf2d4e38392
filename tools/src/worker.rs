//! One load worker process: a single-threaded epoll loop holding up to ~19k client sockets
//! bound to one 127.0.0.x source address. The coordinator drives it with text lines on stdin
//! and reads its answers on stdout (see `Coordinator`).
//!
//! Commands: `connect` · `pub <step> <rate/s> <duration ms>` · `count <step>` · `report <step>` ·
//! `status` · `quit`. Answers: `ready …` once every connection is joined or failed, `sent <step>
//! <messages> <expected deliveries>` when a publish step ends, `count …`, `report …`, `status …`.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

use crate::hist::Hist;
use crate::procfs::mono_ns;
use crate::wire::{self, Proto, PublishTemplate};

/// What this worker's connections do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Subscribe to one topic (W1 receivers, W3/W7 joined connections).
    Sub,
    /// One connection that joins the topic and publishes to it (W1 sender).
    Pub,
    /// W2: each connection is a virtual user in an echo channel (self) and a group channel.
    Rooms,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub target: SocketAddrV4,
    pub src: Ipv4Addr,
    pub proto: Proto,
    pub token: String,
    pub plan: Plan,
    pub conns: usize,
    /// Global index of this worker's first connection (names rooms, publisher ids).
    pub base: usize,
    pub payload: usize,
    /// Connections being set up at once.
    pub concurrency: usize,
    pub heartbeat_secs: u64,
    /// `Sub`: every connection joins its own topic instead of the shared one.
    pub topic_each: bool,
    /// `Pub`: receivers of each publish (for expected-delivery accounting).
    pub fanout: u64,
    /// `Rooms`: members per group channel.
    pub group: usize,
    /// Microseconds to wait after an epoll wake-up before reading, so reads gather more frames.
    pub read_delay_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Connecting,
    Upgrading,
    Joining,
    Ready,
    Closed,
}

struct Conn {
    fd: RawFd,
    state: State,
    joined: u8,
    out_registered: bool,
    dirty: bool,
    hint: u32,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// (publisher, next expected sequence)
    seqs: Vec<(u32, u64)>,
    t_start: u64,
    t_join_sent: u64,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            fd: -1,
            state: State::Idle,
            joined: 0,
            out_registered: false,
            dirty: false,
            hint: 0,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            seqs: Vec::new(),
            t_start: 0,
            t_join_sent: 0,
        }
    }
}

#[derive(Default)]
struct StepStats {
    recv: u64,
    bytes: u64,
    gaps: u64,
    reorder: u64,
    first_ns: u64,
    last_ns: u64,
    hist: Hist,
    /// Least-squares sums of latency (s) against send time (s after `base_ns`), to tell a
    /// steady latency from a growing backlog.
    base_ns: u64,
    n: f64,
    st: f64,
    sl: f64,
    stt: f64,
    stl: f64,
}

impl StepStats {
    /// Seconds of extra latency per second of sending (0 when the server keeps up).
    fn slope(&self) -> f64 {
        let den = self.n * self.stt - self.st * self.st;
        if self.n < 3.0 || den <= 0.0 {
            return 0.0;
        }
        (self.n * self.stl - self.st * self.sl) / den
    }
}

struct Slot {
    conn: usize,
    template: PublishTemplate,
    seq: u64,
    fanout: u64,
}

struct Publishing {
    step: u64,
    rate: f64,
    t0: u64,
    end: u64,
    count: u64,
    sent: u64,
    expected: u64,
}

const STDIN_TOKEN: u64 = u64::MAX;
const READ_BUF: usize = 256 * 1024;
const STEPS_MAX: usize = 1000;

pub struct Worker {
    cfg: Config,
    epfd: RawFd,
    conns: Vec<Conn>,
    buf: Vec<u8>,
    steps: Vec<Option<Box<StepStats>>>,
    slots: Vec<Slot>,
    publishing: Option<Publishing>,
    next_open: usize,
    in_flight: usize,
    connecting: bool,
    ready_sent: bool,
    ok: usize,
    failed: usize,
    closed_after_ready: usize,
    first_error: String,
    last_close: String,
    first_start: u64,
    last_done: u64,
    h_upgrade: Hist,
    h_join: Hist,
    h_total: Hist,
    hb_t0: u64,
    hb_count: u64,
    hb_ns: u64,
    other_frames: u64,
    stdin_buf: Vec<u8>,
    stdin_open: bool,
    upgrade: Vec<u8>,
    topics: usize,
    dirty: Vec<usize>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

impl Worker {
    pub fn new(cfg: Config) -> Worker {
        // SAFETY: plain syscall.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epfd >= 0, "epoll_create1 failed");
        let conns = (0..cfg.conns).map(|_| Conn::new()).collect();
        let publisher = cfg.plan == Plan::Pub;
        let host = cfg.target.to_string();
        let upgrade = wire::upgrade_request(&cfg.proto.path(&cfg.token, publisher), &host);
        let topics = if !cfg.proto.is_phoenix() {
            0
        } else if cfg.plan == Plan::Rooms {
            2
        } else {
            1
        };
        let mut worker = Worker {
            epfd,
            conns,
            buf: vec![0; READ_BUF],
            steps: (0..STEPS_MAX).map(|_| None).collect(),
            slots: Vec::new(),
            publishing: None,
            next_open: 0,
            in_flight: 0,
            connecting: false,
            ready_sent: false,
            ok: 0,
            failed: 0,
            closed_after_ready: 0,
            first_error: String::new(),
            last_close: String::new(),
            first_start: 0,
            last_done: 0,
            h_upgrade: Hist::new(),
            h_join: Hist::new(),
            h_total: Hist::new(),
            hb_t0: mono_ns(),
            hb_count: 0,
            hb_ns: cfg.heartbeat_secs.max(1) * 1_000_000_000,
            other_frames: 0,
            stdin_buf: Vec::new(),
            stdin_open: true,
            upgrade,
            topics,
            dirty: Vec::new(),
            cfg,
        };
        worker.build_slots();
        worker
    }

    /// (topic, self) pairs the connection `i` joins.
    fn topics_of(&self, i: usize) -> Vec<(String, bool)> {
        let global = self.cfg.base + i;
        match self.cfg.plan {
            Plan::Sub if self.cfg.topic_each => vec![(format!("realtime:t-{global}"), false)],
            Plan::Sub | Plan::Pub => vec![("realtime:bench".to_string(), false)],
            Plan::Rooms => vec![
                (format!("realtime:e-{global}"), true),
                (format!("realtime:g-{}", global / self.cfg.group.max(1)), false),
            ],
        }
    }

    fn build_slots(&mut self) {
        match self.cfg.plan {
            Plan::Sub => {}
            Plan::Pub => {
                let payload = wire::user_payload(self.cfg.payload, 0);
                let template = PublishTemplate::new(self.cfg.proto, "realtime:bench", 0, &payload);
                self.slots.push(Slot { conn: 0, template, seq: 0, fanout: self.cfg.fanout });
            }
            Plan::Rooms => {
                for i in 0..self.cfg.conns {
                    let global = self.cfg.base + i;
                    for (index, (topic, _)) in self.topics_of(i).into_iter().enumerate() {
                        let publisher = (global * 2 + index) as u32;
                        let payload = wire::user_payload(self.cfg.payload, publisher);
                        let template = PublishTemplate::new(self.cfg.proto, &topic, index, &payload);
                        let fanout = if index == 0 { 1 } else { self.cfg.group.saturating_sub(1) as u64 };
                        self.slots.push(Slot { conn: i, template, seq: 0, fanout });
                    }
                }
                // Interleave users so that consecutive sends come from different connections.
                let (echo, group): (Vec<Slot>, Vec<Slot>) = std::mem::take(&mut self.slots).into_iter().enumerate().fold(
                    (Vec::new(), Vec::new()),
                    |(mut e, mut g), (n, s)| {
                        if n % 2 == 0 {
                            e.push(s)
                        } else {
                            g.push(s)
                        }
                        (e, g)
                    },
                );
                self.slots = echo.into_iter().chain(group).collect();
            }
        }
    }

    fn emit(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn epoll(&self, op: i32, fd: RawFd, events: u32, token: u64) {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: valid epoll fd and event pointer.
        unsafe {
            libc::epoll_ctl(self.epfd, op, fd, &mut ev);
        }
    }

    pub fn run(mut self) {
        // SAFETY: fd 0 is our stdin pipe.
        unsafe {
            let flags = libc::fcntl(0, libc::F_GETFL);
            libc::fcntl(0, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        self.epoll(libc::EPOLL_CTL_ADD, 0, libc::EPOLLIN as u32, STDIN_TOKEN);
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        while self.stdin_open {
            let now = mono_ns();
            let timeout_ns = self.next_timer(now).saturating_sub(now).min(100_000_000);
            let ts = libc::timespec { tv_sec: (timeout_ns / 1_000_000_000) as i64, tv_nsec: (timeout_ns % 1_000_000_000) as i64 };
            // SAFETY: valid buffer of events.len() entries.
            let n = unsafe { libc::epoll_pwait2(self.epfd, events.as_mut_ptr(), events.len() as i32, &ts, std::ptr::null()) };
            if n < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                panic!("epoll_pwait2 failed: {}", std::io::Error::last_os_error());
            }
            if n > 0 && self.cfg.read_delay_us > 0 {
                std::thread::sleep(std::time::Duration::from_micros(self.cfg.read_delay_us));
            }
            for ev in &events[..n as usize] {
                let (token, flags) = (ev.u64, ev.events);
                if token == STDIN_TOKEN {
                    self.on_stdin();
                    continue;
                }
                self.on_event(token as usize, flags);
            }
            let now = mono_ns();
            self.publish_due(now);
            self.heartbeats_due(now);
            self.pump_connects(now);
            self.flush_dirty();
            self.check_ready();
        }
        for conn in &self.conns {
            if conn.fd >= 0 {
                // SAFETY: our open socket.
                unsafe { libc::close(conn.fd) };
            }
        }
    }

    fn next_timer(&self, now: u64) -> u64 {
        let mut next = now + 100_000_000;
        if let Some(p) = &self.publishing {
            next = next.min(p.t0 + (p.count as f64 * 1e9 / p.rate) as u64);
        }
        if self.ok > 0 && self.topics > 0 {
            let n = self.conns.len() as u64;
            next = next.min(self.hb_t0 + (self.hb_count as u128 * self.hb_ns as u128 / n as u128) as u64);
        }
        next
    }

    // ---- commands ----

    fn on_stdin(&mut self) {
        let mut chunk = [0u8; 4096];
        loop {
            // SAFETY: reading into a local buffer.
            let n = unsafe { libc::read(0, chunk.as_mut_ptr().cast(), chunk.len()) };
            if n == 0 {
                self.stdin_open = false;
                return;
            }
            if n < 0 {
                return;
            }
            self.stdin_buf.extend_from_slice(&chunk[..n as usize]);
        }
    }

    fn take_commands(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(pos) = self.stdin_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=pos).collect();
            lines.push(String::from_utf8_lossy(&line).trim().to_string());
        }
        lines
    }

    fn on_command(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["connect"] => {
                self.connecting = true;
                self.first_start = mono_ns();
            }
            ["pub", step, rate, ms] => {
                let now = mono_ns();
                let rate: f64 = rate.parse().unwrap_or(1.0);
                let ms: u64 = ms.parse().unwrap_or(1000);
                self.publishing = Some(Publishing {
                    step: step.parse().unwrap_or(0),
                    rate: rate.max(0.001),
                    t0: now,
                    end: now + ms * 1_000_000,
                    count: 0,
                    sent: 0,
                    expected: 0,
                });
            }
            ["count", step] => {
                let k: usize = step.parse().unwrap_or(0);
                let recv = self.steps.get(k).and_then(|s| s.as_ref()).map_or(0, |s| s.recv);
                self.emit(&format!("count {k} {recv} {}", self.closed_after_ready));
            }
            ["report", step] => {
                let k: usize = step.parse().unwrap_or(0);
                let line = match self.steps.get(k).and_then(|s| s.as_ref()) {
                    Some(s) => format!(
                        "report {k} recv={} bytes={} gaps={} reorder={} first={} last={} slope={:.6} closed={} other={} close={} h={}",
                        s.recv,
                        s.bytes,
                        s.gaps,
                        s.reorder,
                        s.first_ns,
                        s.last_ns,
                        s.slope(),
                        self.closed_after_ready,
                        self.other_frames,
                        word(&self.last_close),
                        s.hist.encode()
                    ),
                    None => format!(
                        "report {k} recv=0 bytes=0 gaps=0 reorder=0 first=0 last=0 slope=0 closed={} other={} close={} h=-",
                        self.closed_after_ready,
                        self.other_frames,
                        word(&self.last_close)
                    ),
                };
                self.emit(&line);
            }
            ["status"] => {
                let open = self.conns.iter().filter(|c| c.state == State::Ready).count();
                self.emit(&format!("status open={open} closed={} failed={} close={}", self.closed_after_ready, self.failed, word(&self.last_close)));
            }
            ["quit"] => self.stdin_open = false,
            _ => self.emit(&format!("error unknown-command {}", word(line))),
        }
    }

    fn check_ready(&mut self) {
        for line in self.take_commands() {
            self.on_command(&line);
        }
        if self.connecting && !self.ready_sent && self.ok + self.failed == self.conns.len() {
            self.ready_sent = true;
            let line = format!(
                "ready ok={} failed={} first={} last={} err={} hu={} hj={} ht={}",
                self.ok,
                self.failed,
                self.first_start,
                self.last_done,
                word(&self.first_error),
                self.h_upgrade.encode(),
                self.h_join.encode(),
                self.h_total.encode()
            );
            self.emit(&line);
        }
    }

    // ---- connection set-up ----

    fn pump_connects(&mut self, _now: u64) {
        if !self.connecting {
            return;
        }
        while self.in_flight < self.cfg.concurrency.max(1) && self.next_open < self.conns.len() {
            let i = self.next_open;
            self.next_open += 1;
            self.open(i);
        }
    }

    fn fail(&mut self, i: usize, why: &str) {
        if self.first_error.is_empty() {
            self.first_error = why.to_string();
        }
        let conn = &mut self.conns[i];
        let was = conn.state;
        if conn.fd >= 0 {
            // SAFETY: our socket; closing also removes it from the epoll set.
            unsafe { libc::close(conn.fd) };
            conn.fd = -1;
        }
        conn.state = State::Closed;
        conn.rbuf = Vec::new();
        conn.wbuf = Vec::new();
        match was {
            State::Ready => {
                self.closed_after_ready += 1;
                self.last_close = why.to_string();
            }
            State::Closed | State::Idle => {}
            _ => {
                self.failed += 1;
                self.in_flight -= 1;
            }
        }
    }

    fn open(&mut self, i: usize) {
        // SAFETY: plain socket syscalls on a fresh descriptor with valid pointers.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        let now = mono_ns();
        self.in_flight += 1;
        self.conns[i].t_start = now;
        self.conns[i].state = State::Connecting;
        if fd < 0 {
            self.fail(i, &format!("socket: {}", std::io::Error::last_os_error()));
            return;
        }
        self.conns[i].fd = fd;
        let one: libc::c_int = 1;
        let src = sockaddr(SocketAddrV4::new(self.cfg.src, 0));
        let dst = sockaddr(self.cfg.target);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = unsafe {
            libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, (&one as *const libc::c_int).cast(), 4);
            libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, (&one as *const libc::c_int).cast(), 4);
            if libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len) != 0 {
                -2
            } else {
                libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len)
            }
        };
        if rc == -2 {
            self.fail(i, &format!("bind {}: {}", self.cfg.src, std::io::Error::last_os_error()));
            return;
        }
        if rc != 0 && errno() != libc::EINPROGRESS {
            self.fail(i, &format!("connect: {}", std::io::Error::last_os_error()));
            return;
        }
        self.epoll(libc::EPOLL_CTL_ADD, fd, (libc::EPOLLIN | libc::EPOLLOUT) as u32, i as u64);
        self.conns[i].out_registered = true;
    }

    fn on_connected(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        conn.state = State::Upgrading;
        let request = self.upgrade.clone();
        self.queue(i, &request);
    }

    fn on_upgraded(&mut self, i: usize, now: u64) {
        let t_start = self.conns[i].t_start;
        self.h_upgrade.record(now - t_start);
        if self.topics == 0 {
            self.conns[i].state = State::Ready;
            self.on_ready(i, now);
            return;
        }
        self.conns[i].state = State::Joining;
        self.conns[i].t_join_sent = now;
        for (index, (topic, self_)) in self.topics_of(i).into_iter().enumerate() {
            let frame = wire::join_frame(self.cfg.proto, &topic, index, self_);
            self.queue(i, &frame);
        }
    }

    fn on_ready(&mut self, i: usize, now: u64) {
        let conn = &self.conns[i];
        if conn.t_join_sent > 0 {
            self.h_join.record(now - conn.t_join_sent);
        }
        self.h_total.record(now - conn.t_start);
        self.ok += 1;
        self.in_flight -= 1;
        self.last_done = now;
    }

    // ---- IO ----

    fn queue(&mut self, i: usize, bytes: &[u8]) {
        let conn = &mut self.conns[i];
        if conn.fd < 0 {
            return;
        }
        conn.wbuf.extend_from_slice(bytes);
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(i);
        }
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            self.conns[i].dirty = false;
            self.flush(i);
        }
        if self.dirty.is_empty() {
            self.dirty = dirty;
            self.dirty.clear();
        }
    }

    fn flush(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.fd < 0 || conn.state == State::Connecting {
            return;
        }
        while conn.wpos < conn.wbuf.len() {
            let rest = &conn.wbuf[conn.wpos..];
            // SAFETY: writing from our buffer to our socket.
            let n = unsafe { libc::send(conn.fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = errno();
                if e == libc::EAGAIN || e == libc::EINTR {
                    break;
                }
                let why = format!("write: {}", std::io::Error::from_raw_os_error(e));
                self.fail(i, &why);
                return;
            }
            conn.wpos += n as usize;
        }
        let pending = conn.wpos < conn.wbuf.len();
        if !pending {
            conn.wbuf.clear();
            conn.wpos = 0;
            if conn.wbuf.capacity() > 64 * 1024 {
                conn.wbuf = Vec::new();
            }
        }
        if pending != conn.out_registered {
            conn.out_registered = pending;
            let events = libc::EPOLLIN as u32 | if pending { libc::EPOLLOUT as u32 } else { 0 };
            let fd = conn.fd;
            self.epoll(libc::EPOLL_CTL_MOD, fd, events, i as u64);
        }
    }

    fn on_event(&mut self, i: usize, flags: u32) {
        if i >= self.conns.len() || self.conns[i].fd < 0 {
            return;
        }
        if self.conns[i].state == State::Connecting {
            if flags & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 == 0 {
                return;
            }
            let mut err: libc::c_int = 0;
            let mut len = 4 as libc::socklen_t;
            // SAFETY: valid out pointers.
            unsafe {
                libc::getsockopt(self.conns[i].fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut libc::c_int).cast(), &mut len);
            }
            if err != 0 {
                self.fail(i, &format!("connect: {}", std::io::Error::from_raw_os_error(err)));
                return;
            }
            self.on_connected(i);
            self.flush(i);
            return;
        }
        if flags & libc::EPOLLOUT as u32 != 0 {
            self.flush(i);
        }
        if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
            self.on_readable(i);
        }
    }

    fn on_readable(&mut self, i: usize) {
        let mut buf = std::mem::take(&mut self.buf);
        loop {
            let conn = &mut self.conns[i];
            if conn.fd < 0 {
                break;
            }
            let lo = conn.rbuf.len();
            if lo >= buf.len() {
                buf.resize(lo * 2, 0);
            }
            buf[..lo].copy_from_slice(&conn.rbuf);
            conn.rbuf.clear();
            let space = buf.len() - lo;
            // SAFETY: reading into the free part of our buffer.
            let n = unsafe { libc::read(conn.fd, buf[lo..].as_mut_ptr().cast(), space) };
            if n <= 0 {
                let e = if n < 0 { errno() } else { 0 };
                if n < 0 && (e == libc::EAGAIN || e == libc::EINTR) {
                    conn.rbuf.extend_from_slice(&buf[..lo]);
                    break;
                }
                let why = if n == 0 { "eof".to_string() } else { format!("read: {}", std::io::Error::from_raw_os_error(e)) };
                let why = if self.last_close.is_empty() || self.conns[i].state != State::Ready { why } else { self.last_close.clone() };
                self.fail(i, &why);
                break;
            }
            let end = lo + n as usize;
            let now = mono_ns();
            let used = self.process(i, &buf[..end], now);
            let conn = &mut self.conns[i];
            if conn.fd >= 0 {
                conn.rbuf.extend_from_slice(&buf[used..end]);
            }
            if (n as usize) < space {
                break;
            }
        }
        self.buf = buf;
    }

    /// Handles complete frames (or the upgrade response) in `buf`; returns bytes consumed.
    fn process(&mut self, i: usize, buf: &[u8], now: u64) -> usize {
        let mut pos = 0;
        if self.conns[i].state == State::Upgrading {
            let Some(end) = wire::find(buf, b"\r\n\r\n", 0) else {
                if buf.len() > 16 * 1024 {
                    self.fail(i, "upgrade response too large");
                }
                return 0;
            };
            if !buf.starts_with(b"HTTP/1.1 101") {
                let status = String::from_utf8_lossy(&buf[..buf.len().min(60)]).lines().next().unwrap_or("").to_string();
                self.fail(i, &format!("upgrade refused: {status}"));
                return buf.len();
            }
            pos = end + 4;
            self.on_upgraded(i, now);
        }
        while pos < buf.len() {
            let Some((opcode, start, end)) = wire::server_frame(&buf[pos..]) else { break };
            let frame = &buf[pos..pos + end];
            let payload = &frame[start..];
            match opcode {
                1 | 2 => self.on_message(i, opcode, payload, end as u64, now),
                8 => {
                    let code = if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 0 };
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).to_string();
                    self.fail(i, &format!("close {code} {reason}"));
                    return buf.len();
                }
                9 => {
                    let pong = wire::client_frame(net::ws::OpCode::Pong, payload);
                    self.queue(i, &pong);
                }
                _ => {}
            }
            if self.conns[i].fd < 0 {
                return buf.len();
            }
            pos += end;
        }
        pos
    }

    fn on_message(&mut self, i: usize, opcode: u8, payload: &[u8], frame_len: u64, now: u64) {
        let conn = &mut self.conns[i];
        if let Some(stamp) = wire::parse_stamp(payload, conn.hint as usize) {
            conn.hint = stamp.at as u32;
            let (mut gaps, mut reorder) = (0, 0);
            match conn.seqs.iter_mut().find(|e| e.0 == stamp.publisher) {
                Some(entry) => {
                    if stamp.seq == entry.1 {
                        entry.1 += 1;
                    } else if stamp.seq > entry.1 {
                        gaps = stamp.seq - entry.1;
                        entry.1 = stamp.seq + 1;
                    } else {
                        reorder = 1;
                    }
                }
                None => {
                    gaps = stamp.seq;
                    conn.seqs.push((stamp.publisher, stamp.seq + 1));
                }
            }
            let k = (stamp.step as usize).min(STEPS_MAX - 1);
            let step = self.steps[k].get_or_insert_with(Default::default);
            step.recv += 1;
            step.bytes += frame_len;
            step.gaps += gaps;
            step.reorder += reorder;
            if step.recv == 1 {
                step.first_ns = now;
            }
            step.last_ns = now;
            let latency = now.saturating_sub(stamp.time_ns);
            step.hist.record(latency);
            if step.base_ns == 0 {
                step.base_ns = stamp.time_ns.max(1);
            }
            let t = stamp.time_ns.saturating_sub(step.base_ns) as f64 * 1e-9;
            let l = latency as f64 * 1e-9;
            step.n += 1.0;
            step.st += t;
            step.sl += l;
            step.stt += t * t;
            step.stl += t * l;
            return;
        }
        if opcode == 1 && self.cfg.proto.is_phoenix() && wire::find(payload, b"\"phx_reply\"", 0).is_some() {
            if wire::find(payload, b"\"j", 0).is_some() && conn.state == State::Joining {
                if wire::find(payload, b"\"status\":\"ok\"", 0).is_some() {
                    conn.joined += 1;
                    if usize::from(conn.joined) == self.topics {
                        conn.state = State::Ready;
                        self.on_ready(i, now);
                    }
                } else {
                    let text = String::from_utf8_lossy(&payload[..payload.len().min(200)]).to_string();
                    self.fail(i, &format!("join refused: {text}"));
                }
            }
            return;
        }
        self.other_frames += 1;
    }

    // ---- timers ----

    fn publish_due(&mut self, now: u64) {
        let Some(mut p) = self.publishing.take() else { return };
        if !self.slots.is_empty() {
            let nslots = self.slots.len() as u64;
            loop {
                let due = p.t0 + (p.count as f64 * 1e9 / p.rate) as u64;
                if due > now || due >= p.end {
                    break;
                }
                let slot = &mut self.slots[(p.count % nslots) as usize];
                let ready = self.conns[slot.conn].state == State::Ready;
                if ready {
                    slot.template.stamp(due, slot.seq, p.step);
                    slot.seq += 1;
                    p.expected += slot.fanout;
                    p.sent += 1;
                    let conn = &mut self.conns[slot.conn];
                    conn.wbuf.extend_from_slice(&slot.template.frame);
                    if !conn.dirty {
                        conn.dirty = true;
                        self.dirty.push(slot.conn);
                    }
                }
                p.count += 1;
            }
        }
        let next_due = p.t0 + (p.count as f64 * 1e9 / p.rate) as u64;
        if next_due >= p.end && now >= p.end.min(next_due) {
            // Messages whose connection was not ready are skipped and not counted.
            let line = format!("sent {} {} {}", p.step, p.sent, p.expected);
            self.emit(&line);
        } else {
            self.publishing = Some(p);
        }
    }

    fn heartbeats_due(&mut self, now: u64) {
        if self.topics == 0 || self.conns.is_empty() {
            return;
        }
        let n = self.conns.len() as u128;
        loop {
            let due = self.hb_t0 + (self.hb_count as u128 * self.hb_ns as u128 / n) as u64;
            if due > now {
                break;
            }
            let i = (self.hb_count % n as u64) as usize;
            let count = self.hb_count;
            self.hb_count += 1;
            if self.conns[i].state == State::Ready {
                if let Some(frame) = wire::heartbeat_frame(self.cfg.proto, count) {
                    self.queue(i, &frame);
                }
            }
        }
    }
}

/// Makes a value safe to put in a space-separated line.
fn word(text: &str) -> String {
    if text.is_empty() {
        return "-".into();
    }
    text.chars().map(|c| if c.is_whitespace() { '_' } else { c }).collect()
}
