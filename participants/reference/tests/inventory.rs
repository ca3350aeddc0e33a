//! The inventory against a real nats-server: two instances, many concurrent reserves.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use common::{Replies, WAIT, audit_inventory, code, command, order, send_all};
use jetsaga_reference::inventory::{self, Config, Point, Status};
use jetsaga_sagas::protocol::Command;
use jetsaga_testkit::{NatsServer, wait_until};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

fn config(url: &str, catalogue: &[(&str, u64)]) -> Config {
    let mut config = Config::default();
    config.nats.url = url.to_owned();
    config.metrics.listen = String::new();
    config.inventory.catalogue = catalogue
        .iter()
        .map(|(s, n)| ((*s).to_owned(), *n))
        .collect();
    config.inventory.low_stock_threshold = 20;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_oversell_and_stock_is_conserved() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let catalogue = [("p-1", 120), ("p-2", 90), ("p-3", 60)];
    let initial: BTreeMap<String, u64> = catalogue
        .iter()
        .map(|(s, n)| ((*s).to_owned(), *n))
        .collect();

    let token = CancellationToken::new();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let run = inventory::run(
            config(&server.url(), &catalogue),
            token.clone().cancelled_owned(),
        );
        instances.push(tokio::spawn(run));
    }
    wait_until("the inventory consumer and bucket exist", WAIT, || async {
        let Ok(stream) = js.get_stream("JETSAGA_COMMANDS").await else {
            return false;
        };
        stream.consumer_info("participant-inventory").await.is_ok()
            && js.get_key_value("jetsaga_inventory").await.is_ok()
    })
    .await;
    let replies = Replies::collect(&client).await;

    // 500 orders of one or two lines, 1-3 units each: far more demand than stock.
    let skus = ["p-1", "p-2", "p-3"];
    let sagas: Vec<(String, serde_json::Value)> = (0..500u32)
        .map(|i| {
            let first = (skus[(i % 3) as usize], i % 3 + 1);
            let lines = if i % 2 == 0 {
                vec![first]
            } else {
                vec![first, (skus[((i + 1) % 3) as usize], 1)]
            };
            (format!("s-{i}"), order(&lines, 1000, "tok_ok"))
        })
        .collect();
    let reserves: Vec<_> = sagas
        .iter()
        .map(|(s, input)| command("inventory", "reserve", s, 1, input))
        .collect();
    // Every other saga also gets a second attempt at the same time, which the other instance
    // may run: the two race for the same holds near depletion.
    let seconds: Vec<_> = sagas
        .iter()
        .step_by(2)
        .map(|(s, input)| command("inventory", "reserve", s, 2, input))
        .collect();
    let mut interleaved = Vec::new();
    for (i, first) in reserves.iter().enumerate() {
        interleaved.push(first.clone());
        if let Some(second) = seconds.get(i / 2).filter(|_| i % 2 == 0) {
            interleaved.push(second.clone());
        }
    }
    send_all(&js, "inventory", &interleaved).await;
    wait_until("every reserve is answered", WAIT, || async {
        replies.all(&interleaved)
    })
    .await;
    for (first, second) in reserves.iter().step_by(2).zip(&seconds) {
        assert_eq!(
            code(&replies.of(first)),
            code(&replies.of(second)),
            "both attempts of {} answer what the reservation says",
            first.saga_id
        );
    }

    let store = js.get_key_value("jetsaga_inventory").await.unwrap();
    let (products, _) = audit_inventory(&store, &initial).await;
    let mut reserved = Vec::new();
    for (cmd, (saga, input)) in reserves.iter().zip(&sagas) {
        match code(&replies.of(cmd)).as_deref() {
            None => reserved.push((saga.clone(), input.clone())),
            Some("insufficient_stock") => {}
            other => panic!("unexpected reply {other:?} to {}", cmd.command_id),
        }
    }
    assert!(
        !reserved.is_empty() && reserved.len() < 500,
        "{} reserved",
        reserved.len()
    );
    let held: u64 = products.values().map(inventory::Product::reserved).sum();
    assert!(
        products.values().any(|p| p.available < 3),
        "demand exceeds stock: {products:?}"
    );
    assert!(held > 0);

    // Release half, commit the rest, each twice (a redelivery with a new attempt).
    let (to_release, to_commit) = reserved.split_at(reserved.len() / 2);
    let mut second = Vec::new();
    for attempt in 1..=2 {
        let releases: Vec<_> = to_release
            .iter()
            .map(|(s, i)| command("inventory", "release", s, attempt, i))
            .collect();
        let commits: Vec<_> = to_commit
            .iter()
            .map(|(s, i)| command("inventory", "commit", s, attempt, i))
            .collect();
        let all: Vec<_> = releases.into_iter().chain(commits).collect();
        send_all(&js, "inventory", &all).await;
        wait_until("every release and commit is answered", WAIT, || async {
            replies.all(&all)
        })
        .await;
        for cmd in &all {
            assert_eq!(code(&replies.of(cmd)), None, "{}", cmd.command_id);
        }
        second = all;
    }
    assert!(!second.is_empty());
    // A late reserve after a release is refused and holds nothing.
    let (late_saga, late_input) = &to_release[0];
    let late = command("inventory", "reserve", late_saga, 9, late_input);
    send_all(&js, "inventory", std::slice::from_ref(&late)).await;
    wait_until("the late reserve is answered", WAIT, || async {
        replies.all(std::slice::from_ref(&late))
    })
    .await;
    assert_eq!(
        code(&replies.of(&late)).as_deref(),
        Some("reservation_released")
    );

    let (products, _) = audit_inventory(&store, &initial).await;
    let committed_units: u64 = to_commit
        .iter()
        .flat_map(|(_, input)| {
            input["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["quantity"].as_u64().unwrap())
        })
        .sum();
    let sold: u64 = products.values().map(|p| p.sold).sum();
    assert_eq!(sold, committed_units, "commits sold exactly what they held");
    assert!(
        products.values().all(|p| p.holds.is_empty()),
        "every hold was released or sold"
    );

    // Stock events were published for products that ran low.
    let events = js.get_stream("JETSAGA_EVENTS").await.unwrap();
    for subject in [
        "saga.event.inventory.stock.low",
        "saga.event.inventory.stock.depleted",
    ] {
        assert!(
            events
                .get_last_raw_message_by_subject(subject)
                .await
                .is_ok(),
            "{subject}"
        );
    }

    token.cancel();
    for instance in instances {
        tokio::time::timeout(WAIT, instance)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Holds chosen reserve attempts at a [`Point`] until the test opens them.
#[derive(Clone, Default)]
struct Gates(Arc<Mutex<HashMap<GateKey, Arc<Gate>>>>);

/// A command id and the point its attempt stops at.
type GateKey = (String, Point);

struct Gate {
    reached: Semaphore,
    open: Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            reached: Semaphore::new(0),
            open: Semaphore::new(0),
        }
    }
}

impl Gates {
    /// Holds `cmd` at `point`.
    fn add(&self, cmd: &Command, point: Point) -> Arc<Gate> {
        let gate = Arc::new(Gate::default());
        self.0
            .lock()
            .unwrap()
            .insert((cmd.command_id.clone(), point), gate.clone());
        gate
    }

    fn pause(&self) -> inventory::Pause {
        let gates = self.clone();
        Arc::new(move |point, cmd| {
            let gate = gates
                .0
                .lock()
                .unwrap()
                .get(&(cmd.command_id.clone(), point))
                .cloned();
            Box::pin(async move {
                if let Some(gate) = gate {
                    gate.reached.add_permits(1);
                    gate.open.acquire().await.unwrap().forget();
                }
            })
        })
    }
}

impl Gate {
    async fn reached(&self) {
        tokio::time::timeout(WAIT, self.reached.acquire())
            .await
            .expect("the attempt reaches its gate")
            .unwrap()
            .forget();
    }

    fn open(&self) {
        self.open.add_permits(1);
    }
}

/// One inventory instance on its own server, driven by crafted commands.
struct Rig {
    _server: NatsServer,
    js: jetstream::Context,
    client: async_nats::Client,
    replies: Replies,
    token: CancellationToken,
    instance: tokio::task::JoinHandle<Result<(), jetsaga_reference::Error>>,
    initial: BTreeMap<String, u64>,
}

impl Rig {
    async fn start(catalogue: &[(&str, u64)], gates: &Gates) -> Self {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client.clone());
        let token = CancellationToken::new();
        let instance = tokio::spawn(inventory::run_with(
            config(&server.url(), catalogue),
            Some(gates.pause()),
            token.clone().cancelled_owned(),
        ));
        wait_until("the inventory consumer and bucket exist", WAIT, || async {
            let Ok(stream) = js.get_stream("JETSAGA_COMMANDS").await else {
                return false;
            };
            stream.consumer_info("participant-inventory").await.is_ok()
                && js.get_key_value("jetsaga_inventory").await.is_ok()
        })
        .await;
        let replies = Replies::collect(&client).await;
        let initial = catalogue
            .iter()
            .map(|(s, n)| ((*s).to_owned(), *n))
            .collect();
        Self {
            _server: server,
            js,
            client,
            replies,
            token,
            instance,
            initial,
        }
    }

    async fn send(&self, cmd: &Command) {
        send_all(&self.js, "inventory", std::slice::from_ref(cmd)).await;
    }

    async fn reply(&self, cmd: &Command) -> Option<String> {
        wait_until("the command is answered", WAIT, || async {
            self.replies.all(std::slice::from_ref(cmd))
        })
        .await;
        code(&self.replies.of(cmd))
    }

    /// Sends `cmd` and returns its failure code (`None`: ok).
    async fn run(&self, cmd: &Command) -> Option<String> {
        self.send(cmd).await;
        self.reply(cmd).await
    }

    async fn store(&self) -> jetstream::kv::Store {
        self.js.get_key_value("jetsaga_inventory").await.unwrap()
    }

    async fn audit(
        &self,
    ) -> (
        BTreeMap<String, inventory::Product>,
        BTreeMap<String, inventory::Reservation>,
    ) {
        audit_inventory(&self.store().await, &self.initial).await
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.instance)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        drop(self.client);
    }
}

/// Issue 10, hole 2: a `reserve do:1` that runs after its saga committed through `do:2` — a
/// redelivery of a first delivery that died before answering, or one merely slow before or
/// after its stock operations — must leave no hold behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reserve_after_the_commit_holds_nothing() {
    let gates = Gates::default();
    let rig = Rig::start(&[("h-1", 10)], &gates).await;
    let input = order(&[("h-1", 2)], 1000, "tok_ok");

    // Redelivered after the commit: the first delivery did nothing before it died.
    let late = command("inventory", "reserve", "late-a", 1, &input);
    assert_eq!(
        rig.run(&command("inventory", "reserve", "late-a", 2, &input))
            .await,
        None
    );
    assert_eq!(
        rig.run(&command("inventory", "commit", "late-a", 1, &input))
            .await,
        None
    );
    assert_eq!(
        rig.run(&late).await,
        None,
        "a late reserve of a committed saga is ok"
    );

    // Slow before its holds, and slow between its holds and its decision.
    for (saga, point) in [
        ("late-b", Point::BeforeHolds),
        ("late-c", Point::AfterHolds),
    ] {
        let late = command("inventory", "reserve", saga, 1, &input);
        let gate = gates.add(&late, point);
        rig.send(&late).await;
        gate.reached().await;
        assert_eq!(
            rig.run(&command("inventory", "reserve", saga, 2, &input))
                .await,
            None,
            "{saga}"
        );
        assert_eq!(
            rig.run(&command("inventory", "commit", saga, 1, &input))
                .await,
            None,
            "{saga}"
        );
        gate.open();
        assert_eq!(rig.reply(&late).await, None, "{saga}");
    }

    let (products, reservations) = rig.audit().await;
    assert_eq!(products["h-1"].sold, 6, "{products:?}");
    assert!(products["h-1"].holds.is_empty(), "{products:?}");
    assert_eq!(reservations.len(), 3);
    rig.stop().await;
}

/// Issue 10, hole 3: two attempts of one saga's reserve. `do:1` holds the first line, finds
/// the second short and stops before deciding; stock comes back, `do:2` holds both lines and
/// answers ok; then `do:1` goes on with its shortage path. The reservation must keep its holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_attempt_leaves_the_holds_of_the_attempt_that_succeeded() {
    let gates = Gates::default();
    let rig = Rig::start(&[("w-a", 10), ("w-b", 2)], &gates).await;
    let other = order(&[("w-b", 2)], 1000, "tok_ok");
    assert_eq!(
        rig.run(&command("inventory", "reserve", "x", 1, &other))
            .await,
        None
    );

    let input = order(&[("w-a", 1), ("w-b", 1)], 1000, "tok_ok");
    let first = command("inventory", "reserve", "s", 1, &input);
    let gate = gates.add(&first, Point::AfterHolds);
    rig.send(&first).await;
    gate.reached().await;
    // `x` compensates: w-b has stock again, and the second attempt gets both lines.
    assert_eq!(
        rig.run(&command("inventory", "release", "x", 1, &other))
            .await,
        None
    );
    assert_eq!(
        rig.run(&command("inventory", "reserve", "s", 2, &input))
            .await,
        None
    );
    gate.open();
    let answer = rig.reply(&first).await;
    assert_eq!(
        answer, None,
        "the record says reserved, so the first attempt answers ok too"
    );

    let (products, reservations) = rig.audit().await;
    assert_eq!(reservations["s"].status, Status::Reserved);
    assert_eq!(products["w-b"].available, 1, "{products:?}");

    // The commit sells what the reservation holds.
    assert_eq!(
        rig.run(&command("inventory", "commit", "s", 1, &input))
            .await,
        None
    );
    let (products, _) = rig.audit().await;
    assert_eq!((products["w-a"].sold, products["w-b"].sold), (1, 1));
    rig.stop().await;
}

/// A create whose answer is lost although the server stored it (a leader change, a lost
/// connection): async-nats's `create` then reads the key, finds the record and reports
/// `AlreadyExists`, although the record is the attempt's own. Found in a cluster chaos run:
/// the attempt took its own holds back as if another attempt had reserved, and the commit
/// then sold nothing for a committed reservation. Here the test stores the attempt's record
/// itself while the attempt stands between its holds and its create, which is what the
/// attempt sees after such a lost answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_finds_its_own_record_keeps_its_holds() {
    let gates = Gates::default();
    let rig = Rig::start(&[("o-a", 10), ("o-b", 10)], &gates).await;
    let input = order(&[("o-a", 1), ("o-b", 2)], 1000, "tok_ok");
    let reserve = command("inventory", "reserve", "own", 1, &input);
    let gate = gates.add(&reserve, Point::AfterHolds);
    rig.send(&reserve).await;
    gate.reached().await;

    let (products, _) = inventory::snapshot(&rig.store().await).await.unwrap();
    let attempts: Vec<u64> = products["o-a"].holds["own"]
        .attempts
        .iter()
        .copied()
        .collect();
    assert_eq!(attempts.len(), 1, "{products:?}");
    let own = inventory::Reservation {
        status: Status::Reserved,
        items: vec![
            inventory::Line {
                sku: "o-a".into(),
                quantity: 1,
            },
            inventory::Line {
                sku: "o-b".into(),
                quantity: 2,
            },
        ],
        attempt: Some(attempts[0]),
        failure: None,
    };
    rig.store()
        .await
        .create("reservation.own", serde_json::to_vec(&own).unwrap().into())
        .await
        .unwrap();
    gate.open();
    assert_eq!(rig.reply(&reserve).await, None);

    let (products, reservations) = rig.audit().await;
    assert_eq!(reservations["own"], own);
    assert_eq!(products["o-b"].holds["own"].quantity, 2, "{products:?}");
    assert_eq!(
        rig.run(&command("inventory", "commit", "own", 1, &input))
            .await,
        None
    );
    let (products, _) = rig.audit().await;
    assert_eq!((products["o-a"].sold, products["o-b"].sold), (1, 2));
    rig.stop().await;
}

/// Issue 10, hole 8: stock that returns to a level and crosses the threshold again publishes
/// the event again (the server must not drop it as a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crossing_publishes_its_stock_event() {
    use futures::TryStreamExt;
    let rig = Rig::start(&[("e-low", 25), ("e-dep", 5)], &Gates::default()).await;
    // Threshold 20: 25 → 15 is low; 5 → 0 is depleted. Each twice, with a release between.
    let low = order(&[("e-low", 10)], 1000, "tok_ok");
    let dep = order(&[("e-dep", 5)], 1000, "tok_ok");
    for (first, second, input) in [("l-1", "l-2", &low), ("d-1", "d-2", &dep)] {
        assert_eq!(
            rig.run(&command("inventory", "reserve", first, 1, input))
                .await,
            None
        );
        assert_eq!(
            rig.run(&command("inventory", "release", first, 1, input))
                .await,
            None
        );
        assert_eq!(
            rig.run(&command("inventory", "reserve", second, 1, input))
                .await,
            None
        );
    }
    let events = rig.js.get_stream("JETSAGA_EVENTS").await.unwrap();
    let count = |subject: &'static str| {
        let events = events.clone();
        async move {
            let counts: HashMap<String, usize> = events
                .info_with_subjects(subject)
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            counts.get(subject).copied().unwrap_or(0)
        }
    };
    wait_until("both crossings of each line are stored", WAIT, || async {
        count("saga.event.inventory.stock.low").await >= 2
            && count("saga.event.inventory.stock.depleted").await >= 2
    })
    .await;
    assert_eq!(count("saga.event.inventory.stock.low").await, 2);
    assert_eq!(count("saga.event.inventory.stock.depleted").await, 2);
    rig.audit().await;
    rig.stop().await;
}

/// Issue 10, hole 6 (the part a single server can show): a commit or release that finds
/// nothing to do decides it on a read served by the stream leader (`STREAM.MSG.GET`), never
/// on a direct get that a lagging replica may answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_that_write_nothing_read_from_the_leader() {
    let rig = Rig::start(&[("r-1", 10)], &Gates::default()).await;
    // Every leader read of the bucket, by the subject it asked for.
    let leader_reads: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut sub = rig
        .client
        .subscribe("$JS.API.STREAM.MSG.GET.KV_jetsaga_inventory")
        .await
        .unwrap();
    rig.client.flush().await.unwrap();
    let seen = leader_reads.clone();
    tokio::spawn(async move {
        while let Some(msg) = futures::StreamExt::next(&mut sub).await {
            let request: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
            if let Some(subject) = request["last_by_subj"].as_str() {
                seen.lock().unwrap().push(subject.to_owned());
            }
        }
    });
    let read_from_leader = |key: &str| {
        let subject = format!("$KV.jetsaga_inventory.{key}");
        leader_reads.lock().unwrap().contains(&subject)
    };
    let input = order(&[("r-1", 2)], 1000, "tok_ok");

    // A commit that finds no reservation.
    assert_eq!(
        rig.run(&command("inventory", "commit", "ghost", 1, &input))
            .await
            .as_deref(),
        Some("unknown_reservation")
    );
    assert!(read_from_leader("reservation.ghost"), "{leader_reads:?}");

    // A release that finds no hold (the reserve never arrived).
    assert_eq!(
        rig.run(&command("inventory", "release", "never", 1, &input))
            .await,
        None
    );
    assert!(read_from_leader("product.r-1"), "{leader_reads:?}");

    // A commit whose hold is gone: an earlier commit sold it and died before marking the
    // reservation. The instance's cached copy of the product still has the hold.
    assert_eq!(
        rig.run(&command("inventory", "reserve", "s", 1, &input))
            .await,
        None
    );
    let store = rig.store().await;
    let entry = store.entry("product.r-1").await.unwrap().unwrap();
    let mut product: inventory::Product = serde_json::from_slice(&entry.value).unwrap();
    let held = product.holds.remove("s").unwrap();
    product.sold += held.quantity;
    store
        .update(
            "product.r-1",
            serde_json::to_vec(&product).unwrap().into(),
            entry.revision,
        )
        .await
        .unwrap();
    leader_reads.lock().unwrap().clear();
    assert_eq!(
        rig.run(&command("inventory", "commit", "s", 1, &input))
            .await,
        None
    );
    assert!(read_from_leader("product.r-1"), "{leader_reads:?}");
    let (products, _) = rig.audit().await;
    assert_eq!(products["r-1"].sold, 2);
    rig.stop().await;
}
