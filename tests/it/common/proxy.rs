//! A TCP proxy that can cut or stall a dependency.

use herald::config::Secret;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy in front of a dependency; `cut` drops every connection and refuses new ones until
/// `restore`; `stall` holds every byte in both directions (connections stay open, nothing answers)
/// until `resume`; `refuse_new` refuses new connections while the open ones go on working, as a
/// PostgreSQL whose connections are all taken does, until `accept_new`. Lets one test make a
/// dependency unreachable, silent or full without touching the shared server.
pub struct TcpProxy {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    flowing: watch::Sender<bool>,
    accepting: watch::Sender<bool>,
}

/// Copies `from` to `to`, holding what it read while `flowing` is false.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flowing: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if flowing.wait_for(|f| *f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl TcpProxy {
    async fn start(target: &str) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, up_rx) = watch::channel(true);
        let (flowing, flowing_rx) = watch::channel(true);
        let (accepting, accepting_rx) = watch::channel(true);
        let target = target.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*up_rx.borrow() || !*accepting_rx.borrow() {
                    continue; // dropped: refused while cut or full
                }
                let target = target.clone();
                let mut up_rx = up_rx.clone();
                let flowing = flowing_rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::select! {
                        () = pump(in_read, out_write, flowing.clone()) => {}
                        () = pump(out_read, in_write, flowing) => {}
                        _ = up_rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Arc::new(Self {
            addr,
            up,
            flowing,
            accepting,
        })
    }

    /// A proxy in front of the service `url` names; returns it with `url` pointed at it.
    pub async fn in_front_of(url: &str) -> (Arc<Self>, Secret) {
        let mut url = reqwest::Url::parse(url).expect("a service URL");
        let port = url.port().unwrap_or(match url.scheme() {
            "amqp" => 5672,
            _ => 5432,
        });
        let proxy = Self::start(&format!("{}:{port}", url.host_str().expect("a host"))).await;
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(proxy.addr.port())).unwrap();
        (proxy, Secret::new(url.to_string()))
    }

    pub fn stall(&self) {
        self.flowing.send_replace(false);
    }

    pub fn resume(&self) {
        self.flowing.send_replace(true);
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }

    pub fn refuse_new(&self) {
        self.accepting.send_replace(false);
    }

    pub fn accept_new(&self) {
        self.accepting.send_replace(true);
    }
}
