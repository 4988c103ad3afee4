//! Several controllers on one etcd: one leads, any serves the API, and when the leader
//! dies another takes over while the agent's containers keep running and every cron
//! slot fires once. Real etcd
//! (Debian's etcd-server), real controller processes, a real agent and Docker.

use std::time::Duration;

use anyhow::{Context, Result};
use bramble_tests::harness::{self, Agent, Controller, ControllerOpts};
use bramble_tests::{ensure_test_image, eventually};
use serde_json::Value;

#[path = "../../controller/tests/support/etcd.rs"]
mod etcd;

const WAIT: Duration = Duration::from_secs(40);

fn opts(endpoints: &str, prefix: &str) -> ControllerOpts {
    let mut o = ControllerOpts::etcd(endpoints, prefix);
    // A short lease, so the test waits little for a takeover.
    o.args.extend(["--leader-lease".into(), "3s".into()]);
    o
}

/// `GET /v1/controllers` from `c`: (id of the controller that answered, id of the
/// leader if any, how many are listed).
async fn controllers(c: &Controller) -> Result<(String, Option<String>, usize)> {
    let v = c.get("/v1/controllers").await?;
    let list = v.as_array().context("a list")?;
    let id = |pred: &dyn Fn(&Value) -> bool| {
        list.iter()
            .find(|c| pred(c))
            .and_then(|c| c["id"].as_str())
            .map(str::to_string)
    };
    let me = id(&|c| c["answering"] == true).context("the answering controller is listed")?;
    Ok((me, id(&|c| c["leader"] == true), list.len()))
}

/// The ids of the node's running containers of `workload`.
fn containers(node: &str, workload: &str) -> Result<Vec<String>> {
    let ids = harness::node_containers(node, false)?;
    Ok(harness::inspect(&ids)?
        .iter()
        .filter(|c| c["Config"]["Labels"]["bramble.workload"] == workload)
        .filter_map(|c| c["Id"].as_str().map(str::to_string))
        .collect())
}

async fn one_running(node: &str, workload: &str) -> Result<String> {
    eventually(WAIT, &format!("{workload} running on {node}"), || async {
        let ids = containers(node, workload)?;
        Ok((ids.len() == 1).then(|| ids[0].clone()))
    })
    .await
}

async fn node_ready_on(c: &Controller, node: &str) -> Result<()> {
    eventually(WAIT, &format!("{node} Ready on {}", c.url()), || async {
        let v = c.get(&format!("/v1/nodes/{node}")).await.ok();
        Ok(v.filter(|v| v["status"] == "Ready").map(|_| ()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_takes_over_when_the_leader_dies_and_containers_keep_running() -> Result<()> {
    ensure_test_image().await?;
    let store = etcd::Etcd::start(1).await;
    let endpoints = store.endpoints().join(",");
    let prefix = format!("/{}/", harness::unique("ha"));

    let mut a = Controller::start(opts(&endpoints, &prefix)).await?;
    let a_id = eventually(WAIT, "the first controller leads", || async {
        let (me, leader, _) = controllers(&a).await?;
        Ok((leader.as_ref() == Some(&me)).then_some(me))
    })
    .await?;
    let b = Controller::start_sharing(opts(&endpoints, &prefix), &a).await?;
    let b_id = eventually(WAIT, "both controllers listed by the second", || async {
        let (me, leader, n) = controllers(&b).await?;
        Ok((n == 2 && leader.as_ref() == Some(&a_id)).then_some(me))
    })
    .await?;
    assert_ne!(a_id, b_id);

    // The agent knows both; the follower, first in its list, refuses it.
    let node = harness::unique("ha");
    let agent = Agent::start_with(&format!("{},{}", b.url(), a.url()), &a.join_token()?, &node)?;
    let _cleanup = Cleanup(node.clone());
    node_ready_on(&a, &node).await?;

    // Any controller takes writes: applied through the follower, scheduled by the leader.
    let web = harness::unique("web");
    b.apply("web.yaml", &harness::web_service(&web)).await?;
    let first = one_running(&node, &web).await?;
    let ltc = harness::unique("ltc");
    b.apply("ltc.yaml", &harness::wallet(&ltc)).await?;
    let ltc_first = one_running(&node, &ltc).await?;
    let tick = harness::unique("tick");
    b.apply("tick.yaml", &harness::ticking_cronjob(&tick))
        .await?;
    tokio::time::sleep(Duration::from_secs(11)).await;

    // The leader loses power. The follower takes over once its lease ends, the agent
    // finds it, and the containers run on untouched all along: the Wallet too, vouched
    // for by the follower meanwhile (sampled every 100 ms: always the one container).
    a.kill9();
    let sampling = async {
        loop {
            let now = containers(&node, &ltc)?;
            anyhow::ensure!(
                now == std::slice::from_ref(&ltc_first),
                "the wallet stopped or changed during the takeover: {now:?}\n--- agent:\n{}",
                agent.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let takeover = async {
        eventually(WAIT, "the second controller leads", || async {
            let (me, leader, n) = controllers(&b).await?;
            Ok((leader.as_ref() == Some(&me) && n == 1).then_some(()))
        })
        .await?;
        node_ready_on(&b, &node).await
    };
    tokio::select! {
        r = sampling => r?,
        r = takeover => r?,
    }
    assert!(
        !agent.logs().contains("wallets fenced"),
        "the agent fenced its wallets during the takeover:\n{}",
        agent.logs()
    );
    assert_eq!(
        containers(&node, &web)?,
        std::slice::from_ref(&first),
        "the same container"
    );

    // The new leader schedules.
    let api = harness::unique("api");
    b.apply("api.yaml", &harness::web_service(&api)).await?;
    one_running(&node, &api).await?;
    let now = containers(&node, &web)?;
    assert_eq!(
        now,
        [first],
        "still the same container\n--- agent:\n{}\n--- new leader:\n{}",
        agent.logs(),
        b.logs()
    );
    assert_eq!(
        containers(&node, &ltc)?,
        [ltc_first],
        "still the same wallet"
    );

    // Every slot fired once across the change of leader, none was lost.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let fired = harness::every_slot_once(&b, &tick, 5).await?;
    assert!(fired >= 4, "only {fired} slots fired");

    // The old leader comes back as a follower.
    a.restart().await?;
    eventually(WAIT, "the restarted controller follows", || async {
        let (me, leader, n) = controllers(&a).await?;
        Ok((n == 2 && leader.as_ref() == Some(&b_id) && me != b_id).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_with_another_ca_is_refused_before_it_serves() -> Result<()> {
    let store = etcd::Etcd::start(1).await;
    let endpoints = store.endpoints().join(",");
    let prefix = format!("/{}/", harness::unique("ca"));
    let _first = Controller::start(opts(&endpoints, &prefix)).await?;
    // A second controller started with a fresh data dir has its own CA and key.
    let (status, logs) =
        Controller::start_expecting_exit(opts(&endpoints, &prefix), Duration::from_secs(30))
            .await?;
    assert!(!status.success(), "{logs}");
    assert!(logs.contains("cluster CA differs"), "{logs}");
    assert!(logs.contains("copy ca.crt"), "{logs}");
    Ok(())
}

/// Removes the node's containers when the test ends, passed or not.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        harness::remove_node_containers(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_and_an_agent_at_rest_write_nothing_to_etcd() -> Result<()> {
    ensure_test_image().await?;
    let store = etcd::Etcd::start(1).await;
    let endpoints = store.endpoints().join(",");
    let prefix = format!("/{}/", harness::unique("rest"));
    let a = Controller::start(opts(&endpoints, &prefix)).await?;
    let b = Controller::start_sharing(opts(&endpoints, &prefix), &a).await?;
    let node = harness::unique("rest");
    let _agent = Agent::start_with(&format!("{},{}", a.url(), b.url()), &a.join_token()?, &node)?;
    let _cleanup = Cleanup(node.clone());
    let web = harness::unique("web");
    a.apply("web.yaml", &harness::web_service(&web)).await?;
    one_running(&node, &web).await?;
    eventually(WAIT, "the task Running", || async {
        let tasks = a.get(&format!("/v1/tasks?workload={web}")).await?;
        let n = tasks
            .as_array()
            .map_or(0, |a| a.iter().filter(|t| t["phase"] == "Running").count());
        Ok((n == 1).then_some(()))
    })
    .await?;
    // Heartbeats, pings, resyncs, the leader's renewals and both controllers' presence
    // must not touch etcd: its revision counts every write of every client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut raw = store.client().await;
    let before = raw.get("/", None).await?.header().map(|h| h.revision());
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after = raw.get("/", None).await?.header().map(|h| h.revision());
    assert_eq!(before, after, "etcd revisions during 15 s at rest");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_lost_changes_nothing_and_quorum_lost_stops_writes_and_wallets_until_back(
) -> Result<()> {
    ensure_test_image().await?;
    let mut store = etcd::Etcd::start(3).await;
    let endpoints = store.endpoints().join(",");
    let prefix = format!("/{}/", harness::unique("quorum"));
    let a = Controller::start(opts(&endpoints, &prefix)).await?;
    eventually(WAIT, "the first controller leads", || async {
        let (me, leader, _) = controllers(&a).await?;
        Ok((leader.as_ref() == Some(&me)).then_some(()))
    })
    .await?;
    let b = Controller::start_sharing(opts(&endpoints, &prefix), &a).await?;
    eventually(WAIT, "both controllers listed", || async {
        let (_, _, n) = controllers(&b).await?;
        Ok((n == 2).then_some(()))
    })
    .await?;
    let node = harness::unique("quorum");
    let agent = Agent::start_with(&format!("{},{}", a.url(), b.url()), &a.join_token()?, &node)?;
    let _cleanup = Cleanup(node.clone());
    node_ready_on(&a, &node).await?;
    let web = harness::unique("web");
    let ltc = harness::unique("ltc");
    a.apply("web.yaml", &harness::web_service(&web)).await?;
    a.apply("ltc.yaml", &harness::wallet(&ltc)).await?;
    let web_first = one_running(&node, &web).await?;
    let ltc_first = one_running(&node, &ltc).await?;

    // One member of three loses power: nothing changes, writes go on.
    store.kill(2);
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < until {
        assert_eq!(
            containers(&node, &ltc)?,
            std::slice::from_ref(&ltc_first),
            "the wallet with one etcd member down\n--- agent:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let api = harness::unique("api");
    b.apply("api.yaml", &harness::web_service(&api)).await?;
    one_running(&node, &api).await?;

    // A second one: no quorum. A write fails with an answer rather than hanging; no
    // controller can vouch for the node, so its Wallet stops; Services run on.
    store.kill(1);
    let x = harness::unique("x");
    let refused = tokio::time::timeout(
        Duration::from_secs(90),
        a.apply("x.yaml", &harness::web_service(&x)),
    )
    .await
    .context("an answer to a write without quorum, not a hang")?;
    assert!(refused.is_err(), "a write without quorum: {refused:?}");
    eventually(WAIT, "the wallet fenced without quorum", || async {
        Ok(containers(&node, &ltc)?.is_empty().then_some(()))
    })
    .await?;
    assert_eq!(
        containers(&node, &web)?,
        std::slice::from_ref(&web_first),
        "Services run on without quorum"
    );

    // Quorum is back: a leader again, the wallet runs again (once), writes work.
    store.restart(1);
    store.restart(2);
    eventually(
        Duration::from_secs(90),
        "the wallet running again with quorum",
        || async {
            let now = containers(&node, &ltc)?;
            anyhow::ensure!(now.len() <= 1, "two wallets: {now:?}");
            Ok((now.len() == 1).then_some(()))
        },
    )
    .await?;
    let y = harness::unique("y");
    eventually(WAIT, "a write with quorum", || async {
        Ok(b.apply("y.yaml", &harness::web_service(&y))
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    one_running(&node, &y).await?;
    assert_eq!(
        containers(&node, &web)?,
        [web_first],
        "the Service untouched throughout"
    );
    Ok(())
}
