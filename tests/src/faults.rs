//! A fault-injecting HTTP/1.1 proxy between Envoy and the collector, for chaos tests: it passes
//! requests through, or answers the filter's batches and syncs slowly or with 500s, before or
//! after the collector stored them. Health checks (`GET /readyz`) always pass through, so that
//! Envoy keeps sending to the faulty host rather than routing around it.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// What the proxy does to `POST /v1/usage` and `POST /v1/sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass through.
    None,
    /// Forward, then hold the collector's answer this long: the filter gives up (its
    /// `timeout_ms`) although the batch was stored, and must not count it twice when it retries.
    SlowAfterStore(Duration),
    /// Forward, then answer 500: stored, but the filter is told it failed.
    FailAfterStore,
    /// Answer 500 without forwarding.
    FailBefore,
}

/// The proxy; stops when dropped.
pub struct FaultyProxy {
    pub port: u16,
    fault: Arc<Mutex<Fault>>,
    injected: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultyProxy {
    /// Listen on a free port of 127.0.0.1 and forward to the collector on `target_port`.
    pub fn start(target_port: u16) -> Result<FaultyProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let fault = Arc::new(Mutex::new(Fault::None));
        let injected = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, n, s) = (Arc::clone(&fault), Arc::clone(&injected), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (f, n) = (Arc::clone(&f), Arc::clone(&n));
                        std::thread::spawn(move || {
                            let _ = serve(client, target_port, &f, &n);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(FaultyProxy {
            port,
            fault,
            injected,
            stop,
        })
    }

    pub fn set(&self, fault: Fault) {
        if let Ok(mut current) = self.fault.lock() {
            *current = fault;
        }
    }

    /// Requests a fault was applied to so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One HTTP/1.1 message: the head (start line and headers, as sent) and the body.
struct Message {
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Message {
    fn start_line(&self) -> String {
        String::from_utf8_lossy(&self.head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        out.extend_from_slice(&self.body);
        out
    }
}

/// Read one message with a `content-length` body (what Envoy and the collector send here);
/// `None` at the end of the connection.
fn read_message(reader: &mut impl BufRead) -> Result<Option<Message>> {
    let mut head = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            bail!("connection closed inside a message head");
        }
        let text = String::from_utf8_lossy(&line).to_ascii_lowercase();
        if let Some(value) = text.strip_prefix("content-length:") {
            length = value.trim().parse().context("content-length")?;
        }
        if text.starts_with("transfer-encoding:") && text.contains("chunked") {
            bail!("chunked messages are not supported by this proxy");
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some(Message { head, body }))
}

const FAILED: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: 15\r\n\r\ninjected fault\n";

fn serve(
    client: TcpStream,
    target_port: u16,
    fault: &Mutex<Fault>,
    injected: &AtomicU64,
) -> Result<()> {
    client.set_nonblocking(false)?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    let mut upstream: Option<(TcpStream, BufReader<TcpStream>)> = None;
    while let Some(request) = read_message(&mut reader)? {
        let line = request.start_line();
        let faultable = line.starts_with("POST /v1/usage") || line.starts_with("POST /v1/sync");
        let fault = if faultable {
            fault.lock().map(|f| *f).unwrap_or(Fault::None)
        } else {
            Fault::None
        };
        if fault != Fault::None {
            injected.fetch_add(1, Ordering::Relaxed);
        }
        if fault == Fault::FailBefore {
            client.write_all(FAILED)?;
            continue;
        }
        if upstream.is_none() {
            let stream = TcpStream::connect(("127.0.0.1", target_port))?;
            let read_half = BufReader::new(stream.try_clone()?);
            upstream = Some((stream, read_half));
        }
        let Some((to_collector, from_collector)) = upstream.as_mut() else {
            bail!("no upstream connection");
        };
        to_collector.write_all(&request.bytes())?;
        let Some(response) = read_message(from_collector)? else {
            bail!("the collector closed the connection");
        };
        match fault {
            Fault::SlowAfterStore(delay) => {
                std::thread::sleep(delay);
                client.write_all(&response.bytes())?;
            }
            Fault::FailAfterStore => client.write_all(FAILED)?,
            Fault::None | Fault::FailBefore => client.write_all(&response.bytes())?,
        }
    }
    Ok(())
}
