//! A flood of half-open connections (TCP connected, no TLS handshake) and half-sent
//! requests (TLS done, headers never finished) must not starve the controller: an
//! authorised request still gets its answer, promptly, and the half-sent requests are
//! dropped. (Before the bounds, 300 such connections exhausted the file descriptors.)

use std::time::{Duration, Instant};

use bramble_controller::{Config, Controller};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ADMIN: &str = "admin-token-for-flood-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_half_open_connections_and_half_sent_requests_do_not_starve_a_request() {
    let data = tempfile::tempdir().expect("temp dir");
    let controller = Controller::open(Config {
        data_dir: data.path().to_path_buf(),
        admin_token: Some(ADMIN.into()),
        join_token: None,
        viewer_token: None,
        local_agent: None,
        health: Default::default(),
        resync: Duration::from_secs(5),
        mdns: None,
        tls: Default::default(),
        viewer_logs: false,
        cluster: Default::default(),
    })
    .await
    .expect("opens");
    bramble_tls::install_provider();
    let fingerprint = controller.ca_fingerprint().clone();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(bramble_tls::client_config(bramble_tls::Pins::one(
            controller.ca_fingerprint().clone(),
        )))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    // This process holds both ends of every connection.
    bramble_controller::http::serve::raise_file_limit();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(controller.run(listener, async {
        let _ = stopped.await;
    }));
    let url = format!("https://{addr}/v1/version");
    let ok = |r: reqwest::Result<reqwest::Response>| r.is_ok_and(|r| r.status().is_success());
    // Up and answering.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(http.get(&url).bearer_auth(ADMIN).send().await) {
        assert!(Instant::now() < deadline, "the controller never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Half of the flood never starts TLS; the other half completes it and then sends
    // a request's first header lines, never the blank line that ends them.
    let mut half_open = Vec::with_capacity(1000);
    for _ in 0..1000 {
        match TcpStream::connect(addr).await {
            Ok(s) => half_open.push(s),
            Err(e) => panic!(
                "the flood itself failed after {} connections: {e}",
                half_open.len()
            ),
        }
    }
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(bramble_tls::client_config(
        bramble_tls::Pins::one(fingerprint.clone()),
    )));
    let mut half_sent = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let tcp = TcpStream::connect(addr).await.expect("connects");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let mut s = tls.connect(name, tcp).await.expect("TLS");
        s.write_all(b"GET /v1/version HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("half a request");
        half_sent.push(s);
    }
    let started = Instant::now();
    let r = http.get(&url).bearer_auth(ADMIN).send().await;
    let took = started.elapsed();
    assert!(ok(r), "an authorised request is answered during the flood");
    eprintln!(
        "GET /v1/version during 1000 half-open connections and 1000 half-sent requests: {} ms",
        took.as_millis()
    );
    // The half-sent requests are dropped once their headers are late.
    let mut buf = [0u8; 256];
    let first = half_sent.first_mut().expect("one");
    let closed = tokio::time::timeout(Duration::from_secs(30), first.read(&mut buf))
        .await
        .expect("the controller ends a request whose headers never finish");
    let ended = match &closed {
        Ok(0) | Err(_) => true,
        Ok(n) => String::from_utf8_lossy(&buf[..*n]).contains("408"),
    };
    assert!(ended, "{closed:?}");
    assert!(
        took < Duration::from_secs(5),
        "answered, but only after {took:?}"
    );
    drop(half_open);
    drop(half_sent);
}
