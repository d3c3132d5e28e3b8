//! A benchmark ceiling: the least a Pingora service can do per request — answer a fixed body
//! from `request_filter`. The load benchmark compares the gateway with it.
//!
//! usage: fixed_body LISTEN BODY_FILE [THREADS [CERT KEY]]   (HTTPS with ALPN h2 and
//! http/1.1 when a certificate and key are given, as the gateway's TLS listener)

// The gateway's allocator, so the ceiling is measured on equal terms.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Fixed {
    body: Bytes,
}

#[async_trait]
impl ProxyHttp for Fixed {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        // Read the request body like the gateway does, so both do the same I/O.
        while session.read_request_body().await?.is_some() {}
        let mut resp = ResponseHeader::build(200, Some(2))?;
        resp.insert_header("Content-Type", "application/json")?;
        resp.insert_header("Content-Length", self.body.len())?;
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(self.body.clone()), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Error::e_explain(ErrorType::InternalError, "never proxies")
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(body_file)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: fixed_body LISTEN BODY_FILE [THREADS [CERT KEY]]");
        std::process::exit(2);
    };
    let body = std::fs::read(body_file).expect("body file");
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(2);
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(
        &server.configuration,
        Fixed {
            body: Bytes::from(body),
        },
    );
    match (args.get(4), args.get(5)) {
        (Some(cert), Some(key)) => {
            let mut tls = pingora::listeners::tls::TlsSettings::intermediate(cert, key)
                .expect("TLS settings");
            tls.enable_h2();
            service.add_tls_with_settings(listen, None, tls);
        }
        _ => service.add_tcp(listen),
    }
    server.add_service(service);
    server.run_forever();
}
