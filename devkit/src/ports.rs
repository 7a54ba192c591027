//! Ports for servers a test starts later (a collector that is down at first, an Envoy hot
//! restart's listener), where binding port 0 cannot be used.
//!
//! Binding port 0, reading the port and closing it hands out a port from the kernel's
//! ephemeral range, the range every outgoing connection on the machine also takes its local
//! port from: by the time the test binds it, a connection of another test may hold it. So
//! ports are taken below that range instead, starting at a random place, and checked free by
//! binding them.

use std::net::TcpListener;

use anyhow::{bail, Result};
use rand::Rng as _;

/// The kernel's ephemeral range (`ip_local_port_range`), Linux's default if unreadable.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(str::parse::<u16>);
            Some((parts.next()?.ok()?, parts.next()?.ok()?))
        })
        .unwrap_or((32768, 60999))
}

/// A port on 127.0.0.1 that nothing listens on now and that outgoing connections do not take:
/// below the ephemeral range when there is room (10000 ports or more), else above it.
pub fn unused_port() -> Result<u16> {
    let (low, high) = ephemeral_range();
    let (from, to) = if low >= 11_000 {
        (1_024, low)
    } else if high < 55_000 {
        (high + 1, 65_535)
    } else {
        // No room outside the range: the kernel's choice is all there is.
        return Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port());
    };
    let span = u32::from(to - from);
    let start = rand::thread_rng().gen_range(0..span);
    for i in 0..span.min(2_000) {
        let port = from + u16::try_from((start + i) % span).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between {from} and {to}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_ports_are_outside_the_ephemeral_range_and_bindable() {
        let (low, high) = ephemeral_range();
        for _ in 0..50 {
            let port = unused_port().unwrap();
            if low >= 11_000 || high < 55_000 {
                assert!(port < low || port > high, "{port} in {low}-{high}");
            }
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
