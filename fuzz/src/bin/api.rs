//! The API's request parsing and routing on any bytes: they arrive on a
//! connection served with brisk's own HTTP/1 settings (`brisk_api::http1`:
//! head and header limits, timeouts) and each request goes through the
//! same routing and body parsing as brisk's (`routes::route`,
//! `routes::kick_target`, `snapshot_target`, `migration_target`, the 64
//! KiB body limit). No panic, no hang.

use std::time::Duration;

use brisk_api::routes::{kick_target, migration_target, route, snapshot_target};
use brisk_api::Endpoint;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let body = Limited::new(req.into_body(), brisk_api::MAX_BODY).collect().await;
    let status = match (route(&method, &path), body) {
        (Err(reply), _) => reply.status,
        (Ok(_), Err(_)) => 413,
        (Ok(Endpoint::Kick), Ok(b)) => match kick_target(&b.to_bytes()) {
            Ok(_) => 204,
            Err(reply) => reply.status,
        },
        (Ok(Endpoint::Snapshot), Ok(b)) => match snapshot_target(&b.to_bytes()) {
            Ok(_) => 200,
            Err(reply) => reply.status,
        },
        (Ok(Endpoint::SendMigration), Ok(b)) => match migration_target(&b.to_bytes()) {
            Ok(_) => 200,
            Err(reply) => reply.status,
        },
        (Ok(_), Ok(_)) => 200,
    };
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    Ok(r)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .enable_io()
        .build()
        .expect("a runtime");
    afl::fuzz!(|data: &[u8]| {
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let conn = brisk_api::http1()
                .serve_connection(TokioIo::new(server), hyper::service::service_fn(answer));
            let send = async {
                let _ = client.write_all(data).await;
                let _ = client.shutdown().await;
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(conn, send) }).await;
        });
    });
}
