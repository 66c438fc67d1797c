//! The webhook client against real HTTP servers on 127.0.0.1: what each kind of answer becomes,
//! that redirects are not followed, that a slow receiver times out and a huge body is cut, and
//! that loopback is refused unless private addresses are allowed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{any, post};
use event_piper::webhook::client::{Client, ClientSettings, Outcome};
use event_piper::webhook::signing::Secret;
use reqwest::Url;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Serves `app` on 127.0.0.1 on a free port, for as long as the test runs.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

fn client(allow_private: bool, timeout: Duration) -> Client {
    Client::new(ClientSettings {
        timeout,
        max_response_bytes: 64 * 1024,
        allow_private,
    })
    .unwrap()
}

fn url(address: SocketAddr, path: &str) -> Url {
    Url::parse(&format!("http://{address}{path}")).unwrap()
}

/// A route that counts its requests and answers 204, to show a request never arrived.
fn counted(hits: &Arc<AtomicUsize>) -> axum::routing::MethodRouter {
    let hits = Arc::clone(hits);
    any(move || async move {
        hits.fetch_add(1, Ordering::SeqCst);
        StatusCode::NO_CONTENT
    })
}

async fn deliver(client: &Client, url: &Url) -> Outcome {
    client.post(url, &[], Bytes::from_static(b"{}")).await
}

#[tokio::test]
async fn a_2xx_is_delivered_with_our_headers_and_a_verifiable_signature() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| async move {
                seen_tx.send((headers, body)).unwrap();
                (StatusCode::OK, "thanks")
            }),
        )
        .route("/accepted", post(|| async { StatusCode::ACCEPTED }));
    let address = serve(app).await;
    let client = client(true, Duration::from_secs(10));

    let secret = Secret::generate();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = Bytes::from_static(br#"{"events":[{"id":7,"type":"order.paid"}]}"#);
    let headers = [
        ("webhook-id", "msg_7".to_owned()),
        ("webhook-timestamp", now.to_string()),
        ("webhook-signature", secret.sign("msg_7", now, &body)),
    ];
    let outcome = client
        .post(&url(address, "/hook"), &headers, body.clone())
        .await;
    assert_eq!(outcome, Outcome::Delivered { status: 200 });

    let (received, received_body) = seen.recv().await.unwrap();
    assert_eq!(received_body, body);
    assert_eq!(received[header::CONTENT_TYPE], "application/json");
    let agent = received[header::USER_AGENT].to_str().unwrap();
    assert_eq!(agent, format!("event-piper/{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(received["webhook-id"], "msg_7");
    // What the receiver got verifies with the reference implementation.
    standardwebhooks::Webhook::new(&secret.to_string())
        .unwrap()
        .verify(&received_body, &received)
        .expect("the receiver can verify the delivery");

    let outcome = deliver(&client, &url(address, "/accepted")).await;
    assert_eq!(outcome, Outcome::Delivered { status: 202 });
}

#[tokio::test]
async fn a_410_is_gone() {
    let app = Router::new().route(
        "/hook",
        post(|| async { (StatusCode::GONE, "unsubscribed") }),
    );
    let address = serve(app).await;
    let outcome = deliver(
        &client(true, Duration::from_secs(10)),
        &url(address, "/hook"),
    )
    .await;
    assert_eq!(outcome, Outcome::Gone);
}

#[tokio::test]
async fn a_503_is_refused_with_its_retry_after_and_the_start_of_its_body() {
    let app = Router::new()
        .route(
            "/busy",
            post(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "30")],
                    "down for maintenance,\r\nback soon\n",
                )
            }),
        )
        .route(
            "/dated",
            post(|| async {
                let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(86400));
                (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, date)])
            }),
        )
        .route("/bad", post(|| async { StatusCode::BAD_REQUEST }));
    let address = serve(app).await;
    let client = client(true, Duration::from_secs(10));

    assert_eq!(
        deliver(&client, &url(address, "/busy")).await,
        Outcome::Refused {
            status: 503,
            retry_after: Some(Duration::from_secs(30)),
            reason: "HTTP 503: down for maintenance, back soon".into(),
        }
    );
    // A date a day away is capped at an hour.
    assert_eq!(
        deliver(&client, &url(address, "/dated")).await,
        Outcome::Refused {
            status: 429,
            retry_after: Some(Duration::from_secs(3600)),
            reason: "HTTP 429".into(),
        }
    );
    assert_eq!(
        deliver(&client, &url(address, "/bad")).await,
        Outcome::Refused {
            status: 400,
            retry_after: None,
            reason: "HTTP 400".into(),
        }
    );
}

#[tokio::test]
async fn a_redirect_is_refused_not_followed() {
    let hits = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/hook",
            post(|| async { (StatusCode::FOUND, [(header::LOCATION, "/elsewhere")]) }),
        )
        .route(
            "/permanent",
            post(|| async {
                (
                    StatusCode::PERMANENT_REDIRECT,
                    [(header::LOCATION, "/elsewhere")],
                )
            }),
        )
        .route("/elsewhere", counted(&hits));
    let address = serve(app).await;
    let client = client(true, Duration::from_secs(10));

    assert_eq!(
        deliver(&client, &url(address, "/hook")).await,
        Outcome::Refused {
            status: 302,
            retry_after: None,
            reason: "HTTP 302: redirect to /elsewhere not followed".into(),
        }
    );
    let outcome = deliver(&client, &url(address, "/permanent")).await;
    assert!(
        matches!(outcome, Outcome::Refused { status: 308, .. }),
        "{outcome:?}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
}

#[tokio::test]
async fn a_slow_receiver_times_out() {
    let app = Router::new().route(
        "/hook",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            StatusCode::OK
        }),
    );
    let address = serve(app).await;
    let client = client(true, Duration::from_millis(300));
    match deliver(&client, &url(address, "/hook")).await {
        Outcome::Failed { reason } => assert_eq!(reason, "timed out after 300ms"),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

/// An endless body: the client must stop at its limit. With a timeout far longer than the test,
/// a client that read on would hang here rather than pass.
#[tokio::test]
async fn an_endless_response_body_is_cut_at_the_limit() {
    fn endless() -> Body {
        let chunk = Bytes::from_static(b"0123456789abcdef");
        Body::from_stream(futures::stream::repeat_with(move || {
            Ok::<_, std::io::Error>(chunk.clone())
        }))
    }
    let app = Router::new()
        .route(
            "/error",
            post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, endless()).into_response() }),
        )
        .route(
            "/ok",
            post(|| async { (StatusCode::OK, endless()).into_response() }),
        );
    let address = serve(app).await;
    let client = Client::new(ClientSettings {
        timeout: Duration::from_secs(3600),
        max_response_bytes: 20,
        allow_private: true,
    })
    .unwrap();

    assert_eq!(
        deliver(&client, &url(address, "/error")).await,
        Outcome::Refused {
            status: 500,
            retry_after: None,
            reason: "HTTP 500: 0123456789abcdef0123".into(),
        }
    );
    assert_eq!(
        deliver(&client, &url(address, "/ok")).await,
        Outcome::Delivered { status: 200 }
    );
}

#[tokio::test]
async fn loopback_is_refused_unless_private_addresses_are_allowed() {
    let hits = Arc::new(AtomicUsize::new(0));
    let address = serve(Router::new().route("/hook", counted(&hits))).await;
    let port = address.port();
    let strict = client(false, Duration::from_secs(10));

    // A literal address never reaches a resolver: the client checks it itself.
    let literal = url(address, "/hook");
    assert_eq!(
        deliver(&strict, &literal).await,
        Outcome::Failed {
            reason: "address 127.0.0.1 refused (loopback)".into()
        }
    );
    let mapped = Url::parse(&format!("http://[::ffff:127.0.0.1]:{port}/hook")).unwrap();
    assert_eq!(
        deliver(&strict, &mapped).await,
        Outcome::Failed {
            reason: "address ::ffff:127.0.0.1 refused (loopback)".into()
        }
    );
    // A name goes through the resolver, which refuses every loopback address it resolves to.
    let named = Url::parse(&format!("http://localhost:{port}/hook")).unwrap();
    match deliver(&strict, &named).await {
        Outcome::Failed { reason } => {
            assert!(
                reason.starts_with("localhost: address ") && reason.ends_with(" (loopback)"),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "a refused request arrived");

    let lenient = client(true, Duration::from_secs(10));
    assert_eq!(
        deliver(&lenient, &literal).await,
        Outcome::Delivered { status: 204 }
    );
    assert_eq!(
        deliver(&lenient, &named).await,
        Outcome::Delivered { status: 204 }
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_closed_port_is_a_refused_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let outcome = deliver(
        &client(true, Duration::from_secs(10)),
        &url(address, "/hook"),
    )
    .await;
    assert_eq!(
        outcome,
        Outcome::Failed {
            reason: "connection refused".into()
        }
    );
}
