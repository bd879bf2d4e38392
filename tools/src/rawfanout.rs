//! `powa-rawfanout`: the "limit" baseline for W1. It does the least a WebSocket fan-out server
//! can do: a minimal upgrade handshake, then every text message received on `/pub` is
//! encoded once as a server frame and appended to every subscriber's output buffer (any other
//! path); each loop iteration flushes every subscriber's buffer with one `write`, so frames
//! queued while a socket was busy go out together. No channels, no JSON, no auth.
//!
//! Threads: `--threads T` (default 1), each with its own epoll loop and SO_REUSEPORT listener;
//! a publish is handed to the other threads through a mutex-protected inbox and an eventfd.
//!
//! Usage: `powa-rawfanout --addr 127.0.0.1:4200 [--threads 1]`

use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use net::ws::{OpCode, WsDecoder, WsMessage};

const LISTEN: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;
/// A subscriber with more unsent bytes than this is dropped (bounded memory).
const QUEUED_BYTES_MAX: usize = 16 << 20;

type Frame = Arc<Vec<u8>>;

struct Inbox {
    frames: Mutex<Vec<Frame>>,
    eventfd: RawFd,
}

#[derive(PartialEq, Eq)]
enum Role {
    Head,
    Sub,
    Pub,
}

struct Conn {
    fd: RawFd,
    role: Role,
    rbuf: BytesMut,
    decoder: WsDecoder,
    /// Unsent bytes: `out[offset..]`.
    out: Vec<u8>,
    offset: usize,
    blocked: bool,
    queued: bool,
    out_armed: bool,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, events: u32, token: u64) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: valid fds and event pointer.
    unsafe {
        libc::epoll_ctl(epfd, op, fd, &mut ev);
    }
}

fn listener(addr: SocketAddrV4) -> RawFd {
    // SAFETY: socket set-up with valid pointers.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket failed");
        let one: libc::c_int = 1;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&one as *const libc::c_int).cast(), 4);
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, (&one as *const libc::c_int).cast(), 4);
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
            sin_zero: [0; 8],
        };
        if libc::bind(fd, (&sa as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32) != 0 {
            panic!("bind {addr}: {}", std::io::Error::last_os_error());
        }
        assert_eq!(libc::listen(fd, 4096), 0, "listen failed");
        fd
    }
}

struct Loop {
    epfd: RawFd,
    listen_fd: RawFd,
    conns: Vec<Option<Conn>>,
    subs: Vec<RawFd>,
    me: usize,
    inboxes: Arc<Vec<Inbox>>,
    fresh: Vec<Frame>,
    to_flush: Vec<RawFd>,
}

impl Loop {
    fn run(&mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        loop {
            let timeout = if self.to_flush.is_empty() { -1 } else { 0 };
            // SAFETY: valid buffer.
            let n = unsafe { libc::epoll_wait(self.epfd, events.as_mut_ptr(), events.len() as i32, timeout) };
            if n < 0 && errno() != libc::EINTR {
                panic!("epoll_wait: {}", std::io::Error::last_os_error());
            }
            for ev in &events[..n.max(0) as usize] {
                match ev.u64 {
                    LISTEN => self.accept(),
                    WAKE => self.take_inbox(),
                    fd => self.on_event(fd as RawFd, ev.events),
                }
            }
            self.take_inbox();
            if !self.fresh.is_empty() {
                let frames = std::mem::take(&mut self.fresh);
                let mut overflow = Vec::new();
                for i in 0..self.subs.len() {
                    let fd = self.subs[i];
                    if let Some(conn) = self.conns[fd as usize].as_mut() {
                        for frame in &frames {
                            conn.out.extend_from_slice(frame);
                        }
                        if conn.out.len() - conn.offset > QUEUED_BYTES_MAX {
                            overflow.push(fd);
                        } else if !conn.queued && !conn.blocked {
                            conn.queued = true;
                            self.to_flush.push(fd);
                        }
                    }
                }
                for fd in overflow {
                    self.close(fd);
                }
            }
            let flush = std::mem::take(&mut self.to_flush);
            for &fd in &flush {
                if let Some(conn) = self.conns[fd as usize].as_mut() {
                    conn.queued = false;
                }
                self.flush(fd);
            }
            self.to_flush = flush;
            self.to_flush.clear();
        }
    }

    fn accept(&mut self) {
        loop {
            // SAFETY: accept on our listener.
            let fd = unsafe { libc::accept4(self.listen_fd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) };
            if fd < 0 {
                return;
            }
            let one: libc::c_int = 1;
            // SAFETY: valid option pointer.
            unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, (&one as *const libc::c_int).cast(), 4) };
            if self.conns.len() <= fd as usize {
                self.conns.resize_with(fd as usize + 1024, || None);
            }
            self.conns[fd as usize] = Some(Conn {
                fd,
                role: Role::Head,
                rbuf: BytesMut::new(),
                decoder: WsDecoder::new(5_000_000),
                out: Vec::new(),
                offset: 0,
                blocked: false,
                queued: false,
                out_armed: false,
            });
            epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, fd as u64);
        }
    }

    fn take_inbox(&mut self) {
        let inbox = &self.inboxes[self.me];
        let mut counter = 0u64;
        // SAFETY: reading 8 bytes from our eventfd.
        unsafe { libc::read(inbox.eventfd, (&mut counter as *mut u64).cast(), 8) };
        let mut frames = inbox.frames.lock().expect("inbox lock");
        self.fresh.append(&mut frames);
    }

    fn close(&mut self, fd: RawFd) {
        if let Some(conn) = self.conns[fd as usize].take() {
            if conn.role == Role::Sub {
                self.subs.retain(|&s| s != fd);
            }
            // SAFETY: our socket.
            unsafe { libc::close(fd) };
        }
    }

    fn on_event(&mut self, fd: RawFd, flags: u32) {
        if flags & libc::EPOLLOUT as u32 != 0 {
            if let Some(conn) = self.conns[fd as usize].as_mut() {
                conn.blocked = false;
            }
            self.flush(fd);
        }
        if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
            self.on_readable(fd);
        }
    }

    fn on_readable(&mut self, fd: RawFd) {
        let mut chunk = [0u8; 16 * 1024];
        // A publisher gets one read per readiness event (level-triggered epoll reports it again):
        // under overload the backlog stays in its socket instead of in every subscriber's buffer.
        let mut publisher_reads = 0;
        loop {
            if publisher_reads > 0 {
                return;
            }
            // SAFETY: reading into a local buffer.
            let n = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
            if n == 0 || (n < 0 && errno() != libc::EAGAIN && errno() != libc::EINTR) {
                self.close(fd);
                return;
            }
            if n < 0 {
                return;
            }
            let Some(conn) = self.conns[fd as usize].as_mut() else { return };
            if conn.role == Role::Sub {
                // Subscribers send nothing that matters; a close frame ends them.
                if chunk[..n as usize].first().is_some_and(|b| b & 0x0f == 8) {
                    self.close(fd);
                    return;
                }
                continue;
            }
            conn.rbuf.extend_from_slice(&chunk[..n as usize]);
            if conn.role == Role::Head {
                let head = match net::http::parse_head(&conn.rbuf) {
                    Ok(Some(head)) => head,
                    Ok(None) => continue,
                    Err(_) => {
                        self.close(fd);
                        return;
                    }
                };
                let Some(key) = head.header("sec-websocket-key") else {
                    self.close(fd);
                    return;
                };
                let response = net::http::switching_protocols(key);
                // SAFETY: a short write of the handshake response on a fresh socket.
                unsafe { libc::send(fd, response.as_ptr().cast(), response.len(), libc::MSG_NOSIGNAL) };
                let _ = conn.rbuf.split_to(head.len);
                if head.path == "/pub" {
                    conn.role = Role::Pub;
                    publisher_reads = 1;
                } else {
                    conn.role = Role::Sub;
                    conn.rbuf = BytesMut::new();
                    self.subs.push(fd);
                    continue;
                }
            }
            loop {
                match conn.decoder.decode(&mut conn.rbuf) {
                    Ok(Some(WsMessage::Text(bytes) | WsMessage::Binary(bytes))) => {
                        let frame = Arc::new(net::ws::encode_frame(OpCode::Text, &bytes).to_vec());
                        for (i, inbox) in self.inboxes.iter().enumerate() {
                            if i == self.me {
                                self.fresh.push(Arc::clone(&frame));
                            } else {
                                inbox.frames.lock().expect("inbox lock").push(Arc::clone(&frame));
                                let one = 1u64;
                                // SAFETY: writing 8 bytes to an eventfd.
                                unsafe { libc::write(inbox.eventfd, (&one as *const u64).cast(), 8) };
                            }
                        }
                    }
                    Ok(Some(WsMessage::Close(_))) | Err(_) => {
                        self.close(fd);
                        return;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                }
            }
            if conn.role == Role::Pub {
                publisher_reads += 1;
            }
        }
    }

    fn flush(&mut self, fd: RawFd) {
        let Some(conn) = self.conns[fd as usize].as_mut() else { return };
        while conn.offset < conn.out.len() && !conn.blocked {
            let rest = &conn.out[conn.offset..];
            // SAFETY: writing from our buffer to our socket.
            let n = unsafe { libc::send(conn.fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
            if n < 0 {
                if errno() == libc::EAGAIN {
                    conn.blocked = true;
                    if !conn.out_armed {
                        conn.out_armed = true;
                        epoll_ctl(self.epfd, libc::EPOLL_CTL_MOD, fd, (libc::EPOLLIN | libc::EPOLLOUT) as u32, fd as u64);
                    }
                    return;
                }
                self.close(fd);
                return;
            }
            conn.offset += n as usize;
        }
        if conn.offset == conn.out.len() {
            conn.out.clear();
            conn.offset = 0;
            if conn.out.capacity() > 1 << 20 {
                conn.out = Vec::new();
            }
        }
        if conn.out_armed && !conn.blocked {
            // Drained: back to read interest only.
            conn.out_armed = false;
            epoll_ctl(self.epfd, libc::EPOLL_CTL_MOD, fd, libc::EPOLLIN as u32, fd as u64);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut addr = "127.0.0.1:4200".to_string();
    let mut threads = 1usize;
    let mut i = 0;
    while i < args.len() {
        match (args[i].as_str(), args.get(i + 1)) {
            ("--addr", Some(v)) => addr = v.clone(),
            ("--threads", Some(v)) => threads = v.parse().expect("--threads N"),
            _ => {
                eprintln!("usage: powa-rawfanout --addr 127.0.0.1:PORT [--threads N]");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    let addr: SocketAddrV4 = addr.parse().expect("--addr must be IPv4 host:port");
    if addr.ip().octets()[0] != 127 {
        eprintln!("powa-rawfanout listens on loopback only");
        std::process::exit(2);
    }
    let inboxes: Arc<Vec<Inbox>> = Arc::new(
        (0..threads)
            .map(|_| Inbox {
                frames: Mutex::new(Vec::new()),
                // SAFETY: plain syscall.
                eventfd: unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) },
            })
            .collect(),
    );
    let handles: Vec<_> = (0..threads)
        .map(|me| {
            let inboxes = Arc::clone(&inboxes);
            std::thread::spawn(move || {
                // SAFETY: plain syscalls.
                let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
                let listen_fd = listener(addr);
                epoll_ctl(epfd, libc::EPOLL_CTL_ADD, listen_fd, libc::EPOLLIN as u32, LISTEN);
                epoll_ctl(epfd, libc::EPOLL_CTL_ADD, inboxes[me].eventfd, libc::EPOLLIN as u32, WAKE);
                let mut lp = Loop { epfd, listen_fd, conns: Vec::new(), subs: Vec::new(), me, inboxes, fresh: Vec::new(), to_flush: Vec::new() };
                lp.run();
            })
        })
        .collect();
    eprintln!("powa-rawfanout: {threads} thread(s) on {addr}");
    for h in handles {
        let _ = h.join();
    }
}
