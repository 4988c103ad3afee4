//! Three controllers on a three-member etcd, every member and every agent in a network
//! namespace of its own: the leader killed while a node loses power, the leader cut off
//! from etcd and the other controllers while agents still reach it, and a rolling
//! restart of all three controllers. Throughout, a Wallet never runs twice (Docker's
//! view, sampled every 100 ms) and the containers of a change that needs none are never
//! restarted (Docker's events).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bramble_tests::eventually;
use bramble_tests::hanet::{HaCluster, MEMBERS};
use bramble_tests::harness;
use bramble_tests::netns::{running_containers, Container, EventRecorder, Sampler, HEALING_FLAGS};

const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const WAIT: Duration = Duration::from_secs(60);

/// [`HEALING_FLAGS`] and a short leader lease (3 s), so takeovers are quick.
fn flags() -> Vec<&'static str> {
    let mut f = HEALING_FLAGS.to_vec();
    f.extend(["--leader-lease", "3s"]);
    f
}

fn label(workload: &str) -> String {
    format!("bramble.workload={workload}")
}

/// Waits until exactly one container of `workload` runs; it.
async fn the_one(workload: &str) -> Result<Container> {
    eventually(WAIT, &format!("one {workload} running"), || async {
        let now = running_containers(&label(workload))?;
        ensure!(now.len() <= 1, "two of {workload} at once: {now:?}");
        Ok((now.len() == 1).then(|| now[0].clone()))
    })
    .await
}

/// Fails unless every sample saw at most one container, and names the first that saw
/// two.
fn never_two(samples: &[bramble_tests::netns::Sample], what: &str) -> Result<()> {
    ensure!(!samples.is_empty(), "no sample of {what} was taken");
    if let Some(s) = samples.iter().find(|s| s.running.len() > 1) {
        anyhow::bail!("{what} ran twice at {:?}: {:?}", s.at, s.running);
    }
    Ok(())
}

/// Fails unless every sample saw exactly the container `id`.
fn always(samples: &[bramble_tests::netns::Sample], id: &str, what: &str) -> Result<()> {
    never_two(samples, what)?;
    if let Some(s) = samples
        .iter()
        .find(|s| s.running.len() != 1 || s.running[0].id != id)
    {
        anyhow::bail!(
            "{what} stopped or changed at {:?}: {:?} (was {id})",
            s.at,
            s.running
        );
    }
    Ok(())
}

/// A Wallet and a one-replica Service, applied and running.
struct Deployed {
    coin: String,
    web: String,
    wallet: Container,
    service: Container,
}

/// Applies a Wallet and a Service through controller `via` and waits until each runs.
async fn deploy(c: &HaCluster, via: usize) -> Result<Deployed> {
    let (coin, web) = (harness::unique("coin"), harness::unique("web"));
    c.apply_via(via, &harness::wallet(&coin)).await?;
    c.apply_via(via, &harness::web_service(&web)).await?;
    Ok(Deployed {
        wallet: the_one(&coin).await?,
        service: the_one(&web).await?,
        coin,
        web,
    })
}

/// A [`Deployed`] pair under watch: the Wallet's container sampled every 100 ms, and
/// Docker's events of both workloads.
struct Watch {
    coin_events: EventRecorder,
    web_events: EventRecorder,
    sampler: Sampler,
    wallet: String,
    web: String,
    service: String,
}

impl Deployed {
    /// Starts watching the pair.
    fn watch(&self) -> Result<Watch> {
        Ok(Watch {
            coin_events: EventRecorder::start(&label(&self.coin))?,
            web_events: EventRecorder::start(&label(&self.web))?,
            sampler: Sampler::start(&label(&self.coin), SAMPLE_EVERY),
            wallet: self.wallet.id.clone(),
            web: self.web.clone(),
            service: self.service.id.clone(),
        })
    }
}

impl Watch {
    /// Fails unless, since the watch began, the Wallet was the same container in every
    /// sample, no container of either workload stopped, and the Service's container is
    /// still the first one.
    async fn untouched(self, across: &str) -> Result<()> {
        always(
            &self.sampler.stop(),
            &self.wallet,
            &format!("the wallet across {across}"),
        )?;
        no_stop(&self.coin_events, &format!("the wallet across {across}"))?;
        no_stop(&self.web_events, &format!("the Service across {across}"))?;
        ensure!(
            the_one(&self.web).await?.id == self.service,
            "the Service's container changed across {across}"
        );
        Ok(())
    }
}

/// How many slots of the CronJob `name` have fired, as controller `via` reports.
async fn fired(c: &HaCluster, via: usize, name: &str) -> Result<usize> {
    let view = c
        .controller(via)
        .get(&format!("/v1/cronjobs/{name}"))
        .await?;
    Ok(view["firings"].as_array().map_or(0, Vec::len))
}

/// Waits until the CronJob `name` has fired more than `than` slots.
async fn fires_beyond(c: &HaCluster, name: &str, than: usize) -> Result<usize> {
    eventually(
        WAIT,
        &format!("{name} fired more than {than} slots"),
        || async {
            let leader = c.leader().await.context("no leader")?;
            let n = fired(c, leader, name).await?;
            Ok((n > than).then_some(n))
        },
    )
    .await
}

/// Fails if any container of the recorder's label stopped.
fn no_stop(events: &EventRecorder, what: &str) -> Result<()> {
    let died = events.with_action("die");
    ensure!(died.is_empty(), "{what} stopped: {died:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_restarts_nothing_and_a_node_lost_in_a_change_gets_its_wallet_elsewhere(
) -> Result<()> {
    let mut c = HaCluster::start(3, &flags()).await?;
    let first = c.wait_leader(None).await?;
    let follower = (first + 1) % MEMBERS;
    let (coin, web, tick) = (
        harness::unique("coin"),
        harness::unique("web"),
        harness::unique("tick"),
    );
    // Written through a follower: any controller takes writes.
    c.apply_via(follower, &harness::wallet(&coin)).await?;
    c.apply_via(follower, &harness::web_service(&web)).await?;
    c.apply_via(follower, &harness::ticking_cronjob(&tick))
        .await?;
    let wallet = the_one(&coin).await?;
    let service = the_one(&web).await?;
    let web_events = EventRecorder::start(&label(&web))?;
    let sampler = Sampler::start(&label(&coin), SAMPLE_EVERY);

    // The leader loses power: another leads, and nothing restarts meanwhile.
    c.kill_controller(first);
    let second = c.wait_leader(Some(first)).await?;
    for node in c.nodes() {
        c.wait_ready_on(second, &node).await?;
    }
    let api = harness::unique("api");
    let other = (0..MEMBERS)
        .find(|i| *i != first && *i != second)
        .context("a third controller")?;
    c.apply_via(other, &harness::web_service(&api)).await?;
    the_one(&api).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    always(
        &sampler.stop(),
        &wallet.id,
        "the wallet across the leader's death",
    )
    .with_context(|| c.logs())?;
    no_stop(&web_events, "the Service across the leader's death")?;
    ensure!(
        the_one(&web).await?.id == service.id,
        "the Service's container changed"
    );

    // The dead controller comes back (it follows); then the new leader dies at the
    // moment the wallet's node loses power. The third controller takes over and, once
    // the lost node has surely stopped it, runs the wallet elsewhere: once.
    c.start_controller(first).await?;
    c.wait_ready_on(first, &c.nodes()[0]).await?;
    let sampler = Sampler::start(&label(&coin), SAMPLE_EVERY);
    c.kill_controller(second);
    c.power_off(&wallet.node)?;
    let third = c.wait_leader(Some(second)).await?;
    let moved = eventually(WAIT, "the wallet running on another node", || async {
        let now = running_containers(&label(&coin))?;
        ensure!(now.len() <= 1, "two wallets: {now:?}");
        Ok(now.first().filter(|w| w.node != wallet.node).cloned())
    })
    .await
    .with_context(|| c.logs())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    never_two(
        &sampler.stop(),
        "the wallet across the change and the power loss",
    )?;
    ensure!(moved.id != wallet.id);

    // Every cron slot fired once across both changes of leader.
    let fired = harness::every_slot_once(c.controller(third), &tick, 5).await?;
    ensure!(fired >= 3, "only {fired} slots fired");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_steps_down_while_its_agents_keep_their_wallet() -> Result<()> {
    let mut c = HaCluster::start(3, &flags()).await?;
    let leader = c.wait_leader(None).await?;
    let watch = deploy(&c, leader).await?.watch()?;

    // The leader still hears every agent, but neither etcd nor the other controllers:
    // it must stop acting, and one of the others lead.
    c.isolate_controller(leader)?;
    let next = c.wait_leader(Some(leader)).await?;
    eventually(WAIT, "the cut-off leader steps down", || async {
        Ok(c.controller(leader)
            .logs()
            .contains("this controller stopped leading")
            .then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    for node in c.nodes() {
        c.wait_ready_on(next, &node).await?;
    }
    let api = harness::unique("api");
    c.apply_via(next, &harness::web_service(&api)).await?;
    the_one(&api).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Healed, it follows the new leader.
    c.rejoin_controller(leader)?;
    eventually(WAIT, "the old leader follows", || async {
        let list = c.controller(leader).get("/v1/controllers").await.ok();
        let follows = list.as_ref().and_then(|l| l.as_array()).is_some_and(|l| {
            l.len() == MEMBERS
                && l.iter().any(|m| m["leader"] == true)
                && l.iter()
                    .all(|m| !(m["answering"] == true && m["leader"] == true))
        });
        Ok(follows.then_some(()))
    })
    .await
    .with_context(|| c.logs())?;
    watch
        .untouched("the partition")
        .await
        .with_context(|| c.logs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_all_three_controllers_restarts_no_container_and_loses_no_slot(
) -> Result<()> {
    let mut c = HaCluster::start(2, &flags()).await?;
    let leader = c.wait_leader(None).await?;
    let deployed = deploy(&c, leader).await?;
    let tick = harness::unique("tick");
    c.apply_via(leader, &harness::ticking_cronjob(&tick))
        .await?;
    // A slot before the restarts and one after them: every slot between them is
    // checked too.
    let before = fires_beyond(&c, &tick, 0).await?;
    let watch = deployed.watch()?;

    // One after the other, as an operator upgrades them: stop (SIGTERM), start, and
    // wait until it hears every agent again before the next.
    let began = std::time::Instant::now();
    for i in 0..MEMBERS {
        ensure!(
            c.stop_controller(i).await,
            "controller c{i} did not exit on SIGTERM within 10 s"
        );
        let now = c.wait_leader(Some(i)).await?;
        c.start_controller(i).await?;
        for node in c.nodes() {
            c.wait_ready_on(i, &node).await?;
            c.wait_ready_on(now, &node).await?;
        }
    }
    eprintln!(
        "rolling restart of {MEMBERS} controllers took {:?}",
        began.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    watch
        .untouched("the rolling restart")
        .await
        .with_context(|| c.logs())?;
    let leader = c.wait_leader(None).await?;
    let at_end = fired(&c, leader, &tick).await?;
    let after = fires_beyond(&c, &tick, at_end.max(before)).await?;
    let checked = harness::every_slot_once(c.controller(leader), &tick, 5).await?;
    ensure!(checked >= after, "{checked} slots checked of {after}");
    Ok(())
}

/// What an HTTPS `GET /health` to an etcd member at `ip` gets: the body, or why it
/// failed. Trusts the etcd CA `ca` and presents `client` (certificate and key PEM).
async fn etcd_health(ip: &str, ca: &[u8], client: Option<(&[u8], &[u8])>) -> Result<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bramble_tls::install_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect((ip, 2379)).await?;
    let name = ServerName::try_from(ip.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await?;
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut body)).await??;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A certificate for `name` signed by the CA in `dir` (`{ca}.crt`, `{ca}.key`): what a
/// node holds (cluster CA) or what the controller holds (etcd CA).
fn signed_by(dir: &std::path::Path, ca: &str, name: &str) -> Result<(String, String)> {
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join(format!("{ca}.key")))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(dir.join(format!("{ca}.crt")))?,
        key,
    )?;
    let leaf = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&leaf, &issuer)?;
    Ok((cert.pem(), leaf.serialize_pem()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_running_their_own_etcd_members_survive_a_machine_lost_and_refuse_strangers(
) -> Result<()> {
    let mut c = HaCluster::start_with_members(2, &flags()).await?;
    let leader = c.wait_leader(None).await?;
    let follower = (leader + 1) % MEMBERS;
    let deployed = deploy(&c, follower).await?;

    // The members serve only clients with a certificate of the etcd CA: not a
    // stranger, not a node (whose certificate is of the cluster CA).
    let dir = c.controller(follower).data_dir.path().to_path_buf();
    let ip = c.controller_address(follower).to_string();
    let etcd_ca = std::fs::read(dir.join("etcd-ca.crt"))?;
    let (own_cert, own_key) = (
        std::fs::read(dir.join("etcd/client.crt"))?,
        std::fs::read(dir.join("etcd/client.key"))?,
    );
    let health = etcd_health(&ip, &etcd_ca, Some((&own_cert, &own_key))).await?;
    ensure!(
        health.contains("\"health\":\"true\""),
        "the controller's own client: {health}"
    );
    let anonymous = etcd_health(&ip, &etcd_ca, None).await;
    ensure!(
        !anonymous.as_ref().is_ok_and(|b| b.contains("health")),
        "a client without a certificate was served: {anonymous:?}"
    );
    eprintln!("etcd, to a client without a certificate: {anonymous:?}");
    let (node_cert, node_key) = signed_by(&dir, "ca", "a-node")?;
    let as_node = etcd_health(
        &ip,
        &etcd_ca,
        Some((node_cert.as_bytes(), node_key.as_bytes())),
    )
    .await;
    ensure!(
        !as_node.as_ref().is_ok_and(|b| b.contains("health")),
        "a client with a cluster-CA (node) certificate was served: {as_node:?}"
    );
    eprintln!("etcd, to a client with a node's certificate: {as_node:?}");

    let watch = deployed.watch()?;

    // A controller killed alone leaves its etcd running; started again, it replaces it.
    c.kill_controller(follower);
    c.start_controller(follower).await?;
    ensure!(
        c.controller(follower)
            .logs()
            .contains("stopping an etcd left running"),
        "the restarted controller did not replace its old etcd:\n{}",
        c.controller(follower).logs()
    );
    for node in c.nodes() {
        c.wait_ready_on(follower, &node).await?;
    }

    // The leader's machine loses power, its etcd member with it: two of three members
    // remain, another controller leads, writes go on, no container restarts.
    c.power_off_controller(leader)?;
    let next = c.wait_leader(Some(leader)).await?;
    for node in c.nodes() {
        c.wait_ready_on(next, &node).await?;
    }
    let api = harness::unique("api");
    c.apply_via(next, &harness::web_service(&api))
        .await
        .with_context(|| c.logs())?;
    the_one(&api).await.with_context(|| c.logs())?;

    // Power back: it rejoins (member and controller) and follows.
    c.start_controller(leader).await?;
    for node in c.nodes() {
        c.wait_ready_on(leader, &node).await?;
    }
    let now = c.leader().await;
    ensure!(
        now == Some(next),
        "leadership moved on rejoin: c{next} led, now {now:?}\n{}",
        c.logs()
    );
    watch
        .untouched("the machine's loss")
        .await
        .with_context(|| c.logs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_found_the_controllers_over_mdns_keeps_its_wallet_when_the_leader_dies(
) -> Result<()> {
    let mut args = flags();
    args.extend(["--mdns-interface", "{iface}"]);
    let mut c = HaCluster::start(0, &args).await?;
    let node = c.add_discovering_node()?;
    c.wait_ready(&node).await?;
    let leader = c.wait_leader(None).await?;
    let coin = harness::unique("coin");
    c.apply_via(leader, &harness::wallet(&coin)).await?;
    let wallet = the_one(&coin).await?;
    // It links to every controller it found, not only to the leader.
    for i in 0..MEMBERS {
        c.wait_ready_on(i, &node).await?;
    }
    let events = EventRecorder::start(&label(&coin))?;
    let sampler = Sampler::start(&label(&coin), SAMPLE_EVERY);
    c.kill_controller(leader);
    let next = c.wait_leader(Some(leader)).await?;
    c.wait_ready_on(next, &node).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    always(
        &sampler.stop(),
        &wallet.id,
        "the wallet of a node found over mDNS",
    )
    .with_context(|| c.logs())?;
    no_stop(&events, "the wallet of a node found over mDNS")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_lost_changes_nothing_and_two_stop_writes_and_wallets_until_quorum_is_back(
) -> Result<()> {
    let mut c = HaCluster::start(2, &flags()).await?;
    let leader = c.wait_leader(None).await?;
    let Deployed {
        coin,
        web,
        wallet,
        service,
    } = deploy(&c, leader).await?;
    let web_events = EventRecorder::start(&label(&web))?;
    let sampler = Sampler::start(&label(&coin), SAMPLE_EVERY);

    // One member of three loses power: nothing changes, writes go on.
    c.kill_etcd(2);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let api = harness::unique("api");
    let any = c.wait_leader(None).await?;
    c.apply_via(any, &harness::web_service(&api)).await?;
    the_one(&api).await?;
    always(
        &sampler.stop(),
        &wallet.id,
        "the wallet with one etcd member down",
    )
    .with_context(|| c.logs())?;
    let sampler = Sampler::start(&label(&coin), SAMPLE_EVERY);

    // A second one: no quorum. A write gets an answer (an error), not a hang; no
    // controller can vouch for the nodes, so the Wallet stops; Services run on.
    c.kill_etcd(1);
    let x = harness::unique("x");
    let refused = tokio::time::timeout(
        Duration::from_secs(90),
        c.apply_via(any, &harness::web_service(&x)),
    )
    .await
    .context("an answer to a write without quorum, not a hang")?;
    ensure!(refused.is_err(), "a write without quorum: {refused:?}");
    eventually(WAIT, "the wallet fenced without quorum", || async {
        Ok(running_containers(&label(&coin))?.is_empty().then_some(()))
    })
    .await
    .with_context(|| c.logs())?;

    // Quorum back: a leader again, the Wallet runs again (once), writes work.
    c.restart_etcd(1).await?;
    c.restart_etcd(2).await?;
    the_one(&coin).await.with_context(|| c.logs())?;
    let y = harness::unique("y");
    eventually(Duration::from_secs(90), "a write with quorum", || async {
        let Some(l) = c.leader().await else {
            return Ok(None);
        };
        Ok(c.apply_via(l, &harness::web_service(&y))
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    the_one(&y).await?;
    never_two(&sampler.stop(), "the wallet across the loss of quorum")?;
    no_stop(&web_events, "the Service across the loss of quorum")?;
    ensure!(
        the_one(&web).await?.id == service.id,
        "the Service untouched"
    );
    Ok(())
}
