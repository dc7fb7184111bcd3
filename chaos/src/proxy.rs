//! A fault-injecting TCP proxy for one directed replica-to-replica link. Replica `i`
//! reaches replica `j` through the proxy of link (i, j) (`--peer-addresses`), so a link
//! can be cut (connections reset and refused), stalled (accepted, then silent without
//! closing), slowed (latency per chunk) or made flaky (connections dropped at random),
//! independently of every other link.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The behaviour of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum LinkMode {
    /// Bytes pass.
    Pass,
    /// Connections are reset and new ones refused.
    Cut,
    /// Connections stay open but no byte passes.
    Stall,
    /// Every chunk waits this long.
    Slow(u64),
    /// Each chunk has this chance (percent) of killing its connection.
    Flaky(u8),
}

/// One proxy.
pub struct Proxy {
    /// Where it listens.
    pub port: u16,
    mode: watch::Sender<LinkMode>,
}

impl Proxy {
    /// Starts a proxy to `target` on a free port.
    pub async fn start(target: String, seed: u64) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (mode, rx) = watch::channel(LinkMode::Pass);
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if *rx.borrow() == LinkMode::Cut {
                    drop(inbound);
                    continue;
                }
                let (target, rx, rng) = (target.clone(), rx.clone(), rng.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::select! {
                        _ = pump(ri, wo, rx.clone(), rng.clone()) => {}
                        _ = pump(ro, wi, rx, rng) => {}
                    }
                });
            }
        });
        Ok(Proxy { port, mode })
    }

    /// Changes the link's behaviour (existing connections follow).
    pub fn set(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<LinkMode>,
    rng: Arc<Mutex<StdRng>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = mode.wait_for(|m| *m == LinkMode::Cut) => return,
        };
        loop {
            let m = *mode.borrow_and_update();
            match m {
                LinkMode::Cut => return,
                LinkMode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                LinkMode::Slow(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                LinkMode::Flaky(p) => {
                    let roll: u8 = rng.lock().map(|mut r| r.gen_range(0..100)).unwrap_or(100);
                    if roll < p {
                        return;
                    }
                }
                LinkMode::Pass => {}
            }
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
