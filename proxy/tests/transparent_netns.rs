//! Transparent mode's pieces over a real iptables redirect, in a network namespace: the
//! original destination read back, the first bytes sniffed, opaque bytes passed through.
//! Needs root, `ip` and `iptables`; without them the test fails and says which is missing.
//!
//! The test binary re-runs itself inside the namespace (`ip netns exec`) to run
//! `in_namespace`, which is ignored when run directly.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use sluice_proxy::transparent::{Protocol, original_dst, passthrough, sniff};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHILD_ENV: &str = "SLUICE_TRANSPARENT_NETNS_CHILD";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (install iproute2 and iptables)"))
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

#[test]
fn redirected_connections_keep_their_destination_and_pass_through() {
    let uid = run("id", &["-u"]);
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test must run as root (it creates a network namespace)"
    );
    for tool in ["ip", "iptables"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing: apt-get install iptables iproute2"
        );
    }
    let ns = Netns(format!("sluice-transparent-{}", std::process::id()));
    let out = run("ip", &["netns", "add", &ns.0]);
    assert!(
        out.status.success(),
        "ip netns add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(exe)
        .args(["--exact", "in_namespace", "--ignored", "--nocapture"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "in the namespace:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
#[ignore = "run inside a network namespace by redirected_connections_keep_their_destination_and_pass_through"]
async fn in_namespace() {
    assert!(
        std::env::var_os(CHILD_ENV).is_some(),
        "run by the namespace test only"
    );
    assert!(run("ip", &["link", "set", "lo", "up"]).status.success());
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = proxy.local_addr().unwrap().port().to_string();
    // Only port 80 is redirected, so the passthrough's own connection is not.
    let out = run(
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "127.0.0.1",
            "--dport",
            "80",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An upstream that echoes everything it reads.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let app_target: SocketAddr = "127.0.0.1:80".parse().unwrap();

    // HTTP/1 is recognised; the sniffed bytes reach the upstream first.
    let mut client = TcpStream::connect(app_target).await.unwrap();
    let (mut accepted, _) = proxy.accept().await.unwrap();
    assert_eq!(original_dst(&accepted).unwrap(), app_target);
    let request = b"GET /x HTTP/1.1\r\nhost: orders\r\n\r\n";
    client.write_all(request).await.unwrap();
    let (proto, prefix) = sniff(&mut accepted, Duration::from_secs(5)).await.unwrap();
    assert_eq!(proto, Protocol::Http1);
    let relay = tokio::spawn(async move { passthrough(accepted, &prefix, upstream_addr).await });
    let mut echoed = vec![0; request.len()];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, request);
    drop(client);
    relay.await.unwrap().unwrap();

    // Not HTTP (a TLS ClientHello's first bytes): opaque, passed through untouched.
    let mut client = TcpStream::connect(app_target).await.unwrap();
    let (mut accepted, _) = proxy.accept().await.unwrap();
    let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
    client.write_all(&hello).await.unwrap();
    let (proto, prefix) = sniff(&mut accepted, Duration::from_secs(5)).await.unwrap();
    assert_eq!(proto, Protocol::Opaque);
    let relay = tokio::spawn(async move { passthrough(accepted, &prefix, upstream_addr).await });
    let mut echoed = [0; 10];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, hello);
    drop(client);
    relay.await.unwrap().unwrap();

    // A server-first client sends nothing: opaque once the sniff stops waiting.
    let _client = TcpStream::connect(app_target).await.unwrap();
    let (mut accepted, _) = proxy.accept().await.unwrap();
    let (proto, prefix) = sniff(&mut accepted, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!((proto, prefix.len()), (Protocol::Opaque, 0));
}
