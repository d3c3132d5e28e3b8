//! Wires the parts together from a [`Config`] and runs them as Pingora services: the public
//! proxy, the admin API, the developer portal, and the catalog reloader.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::ServiceReadyNotifier;
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;
use tokio::signal::unix::{SignalKind, signal};

use crate::access_log::AccessLog;
use crate::accounts::AccountService;
use crate::admin::AdminApi;
use crate::api::Gateway;
use crate::audit::Audit;
use crate::cache::KeyCache;
use crate::catalog::{CatalogError, CatalogHandle};
use crate::clock::{Clock, SystemClock};
use crate::config::{self, Config};
use crate::connection::ClientConnections;
use crate::keys::{CreateKey, KeyService};
use crate::metrics::{Metrics, StoreMetrics};
use crate::portal::Portal;
use crate::proxy::AudioProxy;
use crate::shutdown::{DrainOnShutdown, Lifecycle, Signals};
use crate::sign::Presigner;
use crate::store::Invalidation;
use crate::store::Store;
use crate::store::instrumented::Instrumented;
use crate::store::lease::{LeaseBackend, Quota};
use crate::store::outbox::Outbox;
use crate::store::portal::PortalStore;
use crate::store::redis::RedisStore;
use crate::store::sqlite::SqliteStore;
use crate::systemd::NotifyReady;
use crate::tls::{CertReloader, Certificates};
use crate::upstream::{Resolver, UpstreamPeers};
use crate::webhooks::{Delivery, Webhooks};

/// Everything a running gateway holds, built without starting any listener.
pub struct App {
    pub gateway: Arc<Gateway>,
    pub metrics: Arc<Metrics>,
    pub keys: Arc<KeyService>,
    pub accounts: Arc<AccountService>,
    pub audit: Arc<Audit>,
    pub catalog: Arc<CatalogHandle>,
    pub cache: Arc<KeyCache>,
    /// The webhook delivery service, when webhooks are on; taken by whoever runs it.
    pub delivery: Option<Delivery>,
    /// The developer portal's storage: the same store as the keys'. Set by [`build_app`];
    /// `None` from [`build_app_with`], whose callers run no portal.
    pub portal_store: Option<Arc<dyn PortalStore>>,
}

/// Builds the app with the store the config names; fails on a store that cannot be opened.
/// The catalog starts empty: [`CatalogReloader`] loads it once the listeners are up.
pub fn build_app(config: &Config, clock: Arc<dyn Clock>) -> Result<App, String> {
    match &config.redis_url {
        Some(urls) => {
            let redis = Arc::new(
                RedisStore::with_wait(urls.expose(), config.store_timeout, config.redis_wait)
                    .map_err(|e| config::redact_passwords_in(&e, urls.expose()))?,
            );
            let mut app = build_app_from(config, Backends::of(redis.clone()), clock)?;
            app.portal_store = Some(redis);
            Ok(app)
        }
        None => {
            let embedded = Arc::new(SqliteStore::open(&config.data_dir)?);
            let mut app = build_app_from(config, Backends::of(embedded.clone()), clock)?;
            app.portal_store = Some(embedded);
            Ok(app)
        }
    }
}

/// What a store provides the app: key records, the leases' atomic step, the event outbox.
pub struct Backends {
    pub keys: Arc<dyn Store>,
    pub leases: Arc<dyn LeaseBackend>,
    pub outbox: Option<Arc<dyn Outbox>>,
}

impl Backends {
    /// All three from one store.
    pub fn of<S: Store + LeaseBackend + Outbox>(store: Arc<S>) -> Self {
        Self {
            keys: store.clone(),
            leases: store.clone(),
            outbox: Some(store),
        }
    }
}

/// Builds the app over a given key store and lease backend (usually one store serving as
/// both), without webhooks: what the in-process tests and the benches use.
pub fn build_app_with(
    config: &Config,
    keys_backend: Arc<dyn Store>,
    lease_backend: Arc<dyn LeaseBackend>,
    clock: Arc<dyn Clock>,
) -> Result<App, String> {
    let backends = Backends {
        keys: keys_backend,
        leases: lease_backend,
        outbox: None,
    };
    build_app_from(config, backends, clock)
}

/// The one wiring the server, the tests and the benches share. Webhooks are on when the
/// config names a receiver and the backends have an outbox.
pub fn build_app_from(
    config: &Config,
    backends: Backends,
    clock: Arc<dyn Clock>,
) -> Result<App, String> {
    let Backends {
        keys: keys_backend,
        leases: lease_backend,
        outbox,
    } = backends;
    let metrics = Arc::new(Metrics::new());
    let store_metrics = StoreMetrics::new();
    store_metrics.register_in(&metrics);
    let mut quota = Quota::new(lease_backend, store_metrics.clone()).with_clock(clock.clone());
    let delivery = match (&config.webhooks, outbox) {
        (Some(target), Some(outbox)) => {
            let events = Arc::new(Webhooks::new(outbox, clock.clone()));
            metrics.register(events.counts.clone());
            let (delivery, crossings) = Delivery::new(events, target.clone());
            quota = quota.with_crossings(crossings);
            Some(delivery)
        }
        _ => None,
    };
    let quota = Arc::new(quota);
    let store: Arc<dyn Store> = Arc::new(Instrumented::new(keys_backend, store_metrics));
    let catalog = Arc::new(CatalogHandle::new(&config.catalog_dir));
    catalog.metrics.register_in(&metrics);
    let cache = Arc::new(KeyCache::new(store.clone(), &config.key_cache));
    cache.metrics.register_in(&metrics);
    let presigner = Presigner::new(
        config.s3.clone(),
        config.credentials.clone(),
        config.url_ttl,
    );
    if !presigner.is_configured() {
        log::warn!(
            "signing is not configured (bucket and AWS credentials): /v1/audio will answer 503 PRESIGN_FAILED"
        );
    }
    let events = delivery.as_ref().map(|d| d.webhooks.clone());
    let keys = Arc::new(
        KeyService::new(
            store.clone(),
            quota.clone(),
            cache.clone(),
            config.plans.clone(),
            config.default_plan.clone(),
            clock.clone(),
        )
        .with_events(events),
    );
    let accounts = Arc::new(AccountService::new(
        store.clone(),
        quota.clone(),
        keys.clone(),
        clock.clone(),
    ));
    let audit = Arc::new(Audit::new(store.clone(), clock.clone()));
    let gateway = Arc::new(
        Gateway::new(
            cache.clone(),
            quota,
            catalog.clone(),
            presigner,
            clock,
            config.failure_policy,
            config.max_body_bytes,
        )
        .with_rates(
            config
                .plans
                .iter()
                .filter_map(|(name, plan)| Some((name.clone(), plan.rate?)))
                .collect(),
        ),
    );
    Ok(App {
        gateway,
        metrics,
        keys,
        accounts,
        audit,
        catalog,
        cache,
        delivery,
        portal_store: None,
    })
}

/// Loads the catalog once the listeners are up (so `/healthz` answers at once and `/readyz`
/// says 503 until the load ends), then reloads it on SIGHUP and whenever a file in its
/// directory changes. A catalog that fails its first load stops the process, as a bad config
/// does: nothing could be served from it.
struct CatalogReloader {
    catalog: Arc<CatalogHandle>,
    watch: bool,
    /// Hold the listeners back until the first load has ended: set when taking over from a
    /// running process (`serve --upgrade`), which keeps serving meanwhile, so no call hears
    /// 503 while this one loads.
    ready_after_load: bool,
}

#[async_trait]
impl BackgroundService for CatalogReloader {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP: {e}");
                return;
            }
        };
        let (tx, mut changes) = tokio::sync::mpsc::channel::<()>(1);
        let _watcher = if self.watch {
            self.watch_files(tx)
        } else {
            None
        };
        // Listeners start only after this, so a SIGHUP can never meet the default action.
        let mut ready = Some(ready);
        if !self.ready_after_load
            && let Some(ready) = ready.take()
        {
            ready.notify_ready();
        }
        if let Err(e) = self.reload().await {
            log::error!(
                "stopping: the catalog in {} cannot be served: {e}",
                self.catalog.dir().display()
            );
            std::process::exit(1);
        }
        if let Some(ready) = ready.take() {
            ready.notify_ready();
        }
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    log::info!("SIGHUP: reloading the catalog");
                    let _ = self.reload().await;
                }
                Some(()) = changes.recv() => {
                    // Editors write in several steps; let them finish, then reload once.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while changes.try_recv().is_ok() {}
                    let _ = self.reload().await;
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}

impl CatalogReloader {
    /// Loads on a blocking-pool thread: parsing takes seconds of CPU for a million tracks,
    /// which must stall neither this service's runtime nor, ever, a request worker. The old
    /// snapshot serves until the new one is swapped in.
    async fn reload(&self) -> Result<u64, CatalogError> {
        let catalog = self.catalog.clone();
        tokio::task::spawn_blocking(move || catalog.reload())
            .await
            .unwrap_or_else(|panic| {
                Err(CatalogError {
                    file: self.catalog.dir().to_path_buf(),
                    line: None,
                    message: format!("load failed: {panic}"),
                })
            })
    }

    /// Watches the catalog directory; each change sends a nudge on `tx`.
    fn watch_files(&self, tx: tokio::sync::mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Our own reads show up as access events; only changes count.
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            w.watch(self.catalog.dir(), RecursiveMode::NonRecursive)
                .map(|()| w)
        });
        match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!("catalog file watching unavailable ({e}); reload with SIGHUP");
                None
            }
        }
    }
}

/// How often the minutes keys were last used in are written (each key at most once a minute,
/// whatever this is).
const LAST_USED_EVERY: Duration = Duration::from_secs(1);

/// Keeps this node in step with the shared store: applies key changes announced by other
/// nodes to the key cache, reports quota used from leases (calls counted during an outage
/// included), returns idle units and writes when keys were last used.
struct StoreSync {
    gateway: Arc<Gateway>,
    cache: Arc<KeyCache>,
}

#[async_trait]
impl BackgroundService for StoreSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
        self.gateway.store().watch(tx);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_used = tokio::time::interval(LAST_USED_EVERY);
        loop {
            tokio::select! {
                Some(change) = changes.recv() => match change {
                    Invalidation::Key(digest) => self.cache.invalidate(&digest).await,
                    Invalidation::All => {
                        // Clear only once the store answers again, so cached keys keep
                        // serving until their records can be read back.
                        while self.gateway.store().ping().await.is_err() {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        self.cache.invalidate_all();
                    }
                },
                _ = tick.tick() => self.gateway.quota().sync(false).await,
                _ = last_used.tick() => {
                    self.gateway.last_used().flush(self.gateway.store().as_ref()).await;
                    self.gateway.flush_key_calls().await;
                    self.gateway.limiter().prune();
                }
                _ = shutdown.changed() => {
                    // Hand over what was counted and held, again and again until the process
                    // exits (it waits for that, within the grace period: see `shutdown`): a
                    // call that still arrives on an open connection may take a new block,
                    // which must go back too, or the next process counts it as used.
                    loop {
                        self.gateway.last_used().flush(self.gateway.store().as_ref()).await;
                        self.gateway.flush_key_calls().await;
                        self.gateway.quota().sync(true).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

/// Creates a development key on the embedded store and prints it with a ready-to-paste call:
/// each start prints a new one (the store keeps only digests, so an earlier key cannot be
/// shown again).
fn create_dev_key(keys: &KeyService, config: &Config) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (view, secret) = runtime
        .block_on(keys.create(CreateKey {
            name: "development".into(),
            account_id: None,
            ..Default::default()
        }))
        .map_err(|e| e.to_string())?;
    let limit = view
        .monthly_limit
        .map_or("unlimited".to_string(), |l| format!("{l} calls/month"));
    println!(
        "development key (embedded store, plan {}, {limit}): {secret}",
        view.plan
    );
    println!(
        "try it: curl -X POST http://{}/v1/audio -H \"Authorization: Bearer {secret}\" -H \"Content-Type: application/json\" -d '{{\"library\":\"{}\"}}'",
        reachable(config.listen),
        dev_library(&config.catalog_dir),
    );
    Ok(())
}

/// The address a local client dials for a listener: loopback for an unspecified one.
pub(crate) fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => ([127, 0, 0, 1], addr.port()).into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            (std::net::Ipv6Addr::LOCALHOST, addr.port()).into()
        }
        _ => addr,
    }
}

/// The library the printed call asks for: the seed's `audio.focus` when the catalog has it,
/// else the first library file (the catalog itself loads later).
fn dev_library(dir: &std::path::Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".toml")
                .map(String::from)
        })
        .collect();
    names.sort();
    if names.iter().any(|n| n == "audio.focus") || names.is_empty() {
        "audio.focus".into()
    } else {
        names.swap_remove(0)
    }
}

/// Runs the gateway until a signal stops it. With `upgrade`, first takes the listening
/// sockets over from the running process (which is told to hand them over with SIGQUIT).
/// With `dev_account` (and the embedded store), prints a development account to sign in to
/// the portal with.
pub fn run(config: Config, upgrade: bool, dev_account: bool) -> Result<(), String> {
    // Pingora binds in a service thread and panics there on a taken address, leaving a process
    // that serves nothing: find out first, and say which setting. (With `upgrade` the
    // addresses are the running process's, and come with its sockets.)
    if !upgrade {
        for (addr, setting, env) in [
            (config.listen, "listen", "AUDIOLIB_LISTEN"),
            (config.admin_listen, "admin_listen", "AUDIOLIB_ADMIN_LISTEN"),
            (
                config.portal.listen,
                "portal.listen",
                "AUDIOLIB_PORTAL_LISTEN",
            ),
        ] {
            std::net::TcpListener::bind(addr).map_err(|e| {
                format!(
                    "cannot listen on {addr} (setting `{setting}`, {env}): {e}; to take over \
                     from a gateway running there, start this one with `serve --upgrade`"
                )
            })?;
        }
    }
    let mut app = build_app(&config, Arc::new(SystemClock))?;
    // The embedded store starts empty: it gets a development key.
    if config.redis_url.is_none() {
        create_dev_key(&app.keys, &config)?;
        if dev_account {
            crate::portal::dev_account(app.accounts.as_ref(), app.portal_store.clone(), &config)?;
        } else {
            println!("developer portal: {}", crate::portal::base_url(&config));
        }
    }

    let conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(config.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ca_file: config
            .upstream_ca_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        upgrade_sock: config.upgrade_sock.to_string_lossy().into_owned(),
        ..Default::default()
    };
    let lifecycle = Lifecycle::new();
    let gateway = app.gateway.clone();
    lifecycle.hold_exit_while(move || gateway.quota().unsynced());
    let opt = upgrade.then(|| Opt {
        upgrade: true,
        ..Default::default()
    });
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // With `upgrade`, this waits for the old process's sockets (see docs/operations.md).
    server.bootstrap();

    let reloader = server.add_service(background_service(
        "catalog reloader",
        CatalogReloader {
            ready_after_load: upgrade,
            catalog: app.catalog.clone(),
            watch: config.catalog_watch,
        },
    ));

    if let Some(delivery) = app.delivery.take() {
        server.add_service(background_service("webhook delivery", delivery));
    }
    server.add_service(background_service(
        "store sync",
        StoreSync {
            gateway: app.gateway.clone(),
            cache: app.cache.clone(),
        },
    ));

    // The upstream's addresses are looked up before the proxy accepts, then kept fresh.
    let upstream = config.upstream.clone().map(UpstreamPeers::new);
    let resolver = upstream.clone().map(|peers| {
        server.add_service(background_service("upstream resolver", Resolver { peers }))
    });

    let access_log = Arc::new(AccessLog::start(config.log_format)?);
    app.metrics.register(access_log.dropped.clone());
    let mut proxy = pingora::proxy::HttpProxy::new(
        AudioProxy {
            gateway: app.gateway.clone(),
            cors: config.cors.clone(),
            upstream,
            trusted_proxies: config.trusted_proxies.clone(),
            limits: config.limits.clone(),
            metrics: app.metrics.clone(),
            access_log,
            lifecycle,
        },
        server.configuration.clone(),
    );
    proxy.handle_init_modules();
    let mut options = HttpServerOptions::default();
    options.h2c = config.h2c;
    // An idle HTTP/2 connection closes like an idle HTTP/1.1 keep-alive one.
    options.h2_idle_timeout = Some(config.limits.keepalive);
    proxy.server_options = Some(options);
    let mut connections =
        ClientConnections::new(Arc::new(proxy), &config.limits).map_err(|e| e.to_string())?;
    app.metrics.register(connections.open_gauge.clone());
    app.metrics.register(connections.refused.clone());
    app.metrics.register(connections.handshakes_failed.clone());
    let certificates = match &config.tls {
        Some(files) => {
            let certificates = Certificates::load(files.clone()).map_err(|e| e.to_string())?;
            app.metrics.register(certificates.reloads.clone());
            // The handshake is done by `ClientConnections`, under the head timeout, on a
            // plain TCP listener.
            connections = connections.with_tls(certificates.listener_settings().build());
            Some(certificates)
        }
        None => None,
    };
    let mut proxy = Service::new("audiolib proxy".to_string(), connections);
    proxy.add_tcp(&config.listen.to_string());
    let cert_reloader = certificates.map(|certificates| {
        server.add_service(background_service(
            "certificate reloader",
            CertReloader { certificates },
        ))
    });
    let proxy = server.add_service(proxy);
    if let Some(cert_reloader) = &cert_reloader {
        proxy.add_dependency(cert_reloader);
    }
    proxy.add_dependency(&reloader);
    if let Some(resolver) = &resolver {
        proxy.add_dependency(resolver);
    }

    let portal = Portal::of_app(&app, &config)?;
    let mut admin = Service::new(
        "admin".to_string(),
        AdminApi::new(
            app.keys.clone(),
            app.accounts.clone(),
            app.audit.clone(),
            app.metrics.clone(),
            config.admin_token.as_ref().map(config::Secret::expose),
        )
        .with_invites(portal.invites()),
    );
    admin.add_tcp(&config.admin_listen.to_string());
    admin.threads = Some(1);
    server.add_service(admin);

    let mut portal = Service::new("portal".to_string(), portal);
    portal.add_tcp(&config.portal.listen.to_string());
    portal.threads = Some(1);
    server.add_service(portal);

    let notify = server.add_service(background_service("systemd notify", NotifyReady));
    notify.add_dependency(&proxy);
    server.add_service(background_service(
        "drain on shutdown",
        DrainOnShutdown { lifecycle },
    ));

    log::info!(
        "serving {} on {} (admin on {}, portal on {}), loading the catalog from {}",
        match (&config.tls, config.h2c) {
            (Some(_), _) => "HTTPS (HTTP/2 and HTTP/1.1)",
            (None, true) => "HTTP (HTTP/1.1 and HTTP/2 with prior knowledge)",
            (None, false) => "HTTP",
        },
        config.listen,
        config.admin_listen,
        config.portal.listen,
        config.catalog_dir.display(),
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals { lifecycle }),
    });
    Ok(())
}
