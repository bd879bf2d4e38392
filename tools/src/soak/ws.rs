//! One client WebSocket on a tokio stream for the soak workers: the upgrade, masked frames
//! out, unmasked frames in.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use bytes::BytesMut;
use net::ws::{encode_client_frame, OpCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub(crate) struct Ws {
    pub(crate) stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
}

pub(crate) enum In {
    Text(Vec<u8>),
    Close(u16),
    Other,
}

impl Ws {
    pub(crate) async fn connect(src: Ipv4Addr, target: SocketAddrV4, token: &str) -> std::io::Result<Ws> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
        let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(std::net::SocketAddr::V4(target)))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        let mut ws = Ws { stream, buf: Vec::with_capacity(4096), start: 0 };
        let request = format!(
            "GET /realtime/v1/websocket?apikey={token}&vsn=2.0.0 HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: cG93YS1zb2FrLWNsaWVudA==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        ws.stream.write_all(request.as_bytes()).await?;
        let head_end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(p) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return Ok(p + 4);
                }
                let mut chunk = [0u8; 2048];
                let n = ws.stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed during the upgrade"));
                }
                ws.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upgrade timed out"))??;
        if !ws.buf.starts_with(b"HTTP/1.1 101") {
            let line = String::from_utf8_lossy(&ws.buf[..ws.buf.len().min(80)]).lines().next().unwrap_or("").to_string();
            return Err(std::io::Error::other(format!("upgrade refused: {line}")));
        }
        ws.buf.drain(..head_end);
        Ok(ws)
    }

    pub(crate) async fn send(&mut self, opcode: OpCode, body: &[u8]) -> std::io::Result<()> {
        let mut out = BytesMut::with_capacity(body.len() + 14);
        encode_client_frame(opcode, true, body, [0; 4], &mut out);
        self.stream.write_all(&out).await
    }

    pub(crate) async fn text(&mut self, body: &str) -> std::io::Result<()> {
        self.send(OpCode::Text, body.as_bytes()).await
    }

    /// The next frame (cancel-safe: bytes are kept in `buf` between calls).
    pub(crate) async fn next(&mut self) -> std::io::Result<In> {
        loop {
            if let Some((opcode, header, end)) = server_frame(&self.buf[self.start..]) {
                let payload = self.buf[self.start + header..self.start + end].to_vec();
                self.start += end;
                if self.start > 64 * 1024 || self.start == self.buf.len() {
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                return Ok(match opcode {
                    0x1 => In::Text(payload),
                    0x8 => In::Close(if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 }),
                    0x9 => {
                        self.send(OpCode::Pong, &payload).await?;
                        In::Other
                    }
                    _ => In::Other,
                });
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed by the server"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One server frame at the start of `buf`: (opcode, header length, total length).
fn server_frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (len, header): (usize, usize) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let header = header + if b1 & 0x80 != 0 { 4 } else { 0 };
    (buf.len() >= header.checked_add(len)?).then_some((b0 & 0x0f, header, header + len))
}
