//! Private mode over every endpoint of the router: each read of the cache needs a read
//! token, the probes of a load balancer do not.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt as _;

use super::{app, AppState};
use crate::config::{Config, Scope, TokenConfig, TokenHash};
use crate::nix::SecretKey;
use crate::store::memory::MemoryStore;

const NARINFO: &str = include_str!("../../tests/fixtures/narinfo/top.narinfo");
const HASH: &str = "f904kp3djilk732cgbnxhpy7vzykbqsh";
const NAR: &str = "nar/07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz";
const DRV: &str = "5g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-top.drv";
const REALISATION: &str =
    "realisations/sha256:1h86vccx9vgcyrkj3zv4b7j3r8rrc0z0r4r6q4jp1bz4g4jcv7vb!out.doi";

/// A private cache holding one object behind each endpoint.
fn private_state() -> AppState {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    mem.insert(
        &format!("{HASH}.ls"),
        r#"{"version":1,"root":{"type":"directory"}}"#,
    );
    mem.insert(NAR, vec![1u8; 100]);
    mem.insert(&format!("log/{DRV}"), "building top\n");
    let realisation = format!(r#"{{"outPath":"{HASH}-top","signatures":[]}}"#);
    mem.insert(REALISATION, realisation.clone());
    mem.insert(&format!("build-trace/{DRV}/out"), realisation);
    let mut cfg = Config::default();
    cfg.auth.private = true;
    cfg.auth.tokens = vec![TokenConfig {
        name: "reader".into(),
        hash: TokenHash::of("rtok"),
        scopes: vec![Scope::Read],
    }];
    AppState::new(
        cfg,
        mem,
        vec![SecretKey::generate("test-cellar-1").unwrap()],
    )
    .unwrap()
}

async fn status(st: &AppState, method: &str, path: &str, token: Option<&str>) -> StatusCode {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    app(st.clone())
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn private_mode_guards_every_read_and_leaves_the_probes_open() {
    let st = private_state();
    let guarded = [
        "/nix-cache-info".to_owned(),
        format!("/{HASH}.narinfo"),
        format!("/{HASH}.ls"),
        format!("/{NAR}"),
        format!("/log/{DRV}"),
        format!("/{REALISATION}"),
        format!("/build-trace/{DRV}/out"),
        "/status".to_owned(),
        "/metrics".to_owned(),
    ];
    for path in &guarded {
        for method in ["GET", "HEAD"] {
            if method == "HEAD"
                && matches!(path.as_str(), "/nix-cache-info" | "/status" | "/metrics")
            {
                continue; // GET-only routes
            }
            assert_eq!(
                status(&st, method, path, None).await,
                StatusCode::UNAUTHORIZED,
                "{method} {path} without a token"
            );
            assert_eq!(
                status(&st, method, path, Some("wrong")).await,
                StatusCode::FORBIDDEN,
                "{method} {path} with an unknown token"
            );
            assert_eq!(
                status(&st, method, path, Some("rtok")).await,
                StatusCode::OK,
                "{method} {path} with the read token"
            );
        }
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            status(&st, "GET", path, None).await,
            StatusCode::OK,
            "{path}"
        );
    }
}
