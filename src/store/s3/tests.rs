use super::*;

#[test]
fn content_range_header() {
    assert_eq!(
        ContentRange::parse_header("bytes 0-99/1234"),
        Some(ContentRange {
            start: 0,
            end: 99,
            total: 1234
        })
    );
    assert_eq!(ContentRange::parse_header("bytes */1234"), None);
}

/// /readyz asks once: a store refusing connections is reported after one attempt, not
/// after the SDK's retries.
#[tokio::test]
async fn ping_makes_one_attempt() {
    use crate::config::{S3Credentials, Secret};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    // A "store" that accepts connections and closes them at once.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let cfg = S3StoreConfig {
        bucket: "b".into(),
        endpoint: Some(format!("http://{addr}")),
        region: "us-east-1".into(),
        prefix: String::new(),
        force_path_style: true,
        direct_requests: true,
        credentials: Some(S3Credentials {
            access_key_id: "k".into(),
            secret_access_key: Secret("s".into()),
        }),
        connect_timeout: Duration::from_secs(2),
        redirect: None,
    };
    let store = S3Store::new(&cfg, Duration::from_secs(5)).await;
    assert!(store.ping().await.is_err());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Requests other than the probe keep the SDK's retries.
    let _ = store.head("x").await;
    assert!(accepted.load(Ordering::SeqCst) > 2);
}
