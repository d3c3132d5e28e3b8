//! Quota exactness through the real binary under concurrency (SPEC §4).

mod common;

use std::sync::{Arc, Barrier};

use common::{Gateway, agent, read_reply};

#[test]
fn limit_50_under_400_concurrent_requests_on_50_connections() {
    let gw = Arc::new(Gateway::start());
    let (id, key) = gw.create_key("free", Some(Some(50)));
    let connections = 50;
    let per_connection = 8;
    let start = Arc::new(Barrier::new(connections));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let gw = gw.clone();
            let key = key.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                // One agent per thread: its pool keeps a single keep-alive connection.
                let client = agent();
                start.wait();
                (0..per_connection)
                    .map(|_| {
                        let reply = read_reply(
                            client
                                .post(gw.url("/v1/audio"))
                                .header("Authorization", format!("Bearer {key}"))
                                .send(r#"{"library":"audio.sleep"}"#)
                                .unwrap(),
                        );
                        if reply.status == 429 {
                            reply.assert_error(429, "QUOTA_EXCEEDED");
                        }
                        reply.status
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let statuses: Vec<u16> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let denied = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(statuses.len(), 400);
    assert_eq!((ok, denied), (50, 350), "other statuses: {statuses:?}");
    assert_eq!(gw.usage(&id), 50);
}
