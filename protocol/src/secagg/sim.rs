//! Runs one secure-aggregation round with every node's and the coordinator's state machine in
//! one process, no network: for the property tests, the "what the coordinator sees" test and the
//! benchmark. Nodes drop out at chosen steps; everything the coordinator receives can be recorded.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::client::{AdvertisedKeys, Client, EncryptedShare, PeerRefusal, PeerVerifier, RoundParams};
use super::keys::{self, RoundKeys};
use super::server::{Outcome, Server, ServerAction};
use super::{SecAggError, UnmaskShare};
use crate::pki::{self, Role, SignSpec};

/// The step before which a node goes away (it never sends that step's message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropAt {
    Keys,
    Shares,
    Input,
    Consistency,
    Unmask,
    /// The node stays to the end.
    Never,
}

/// A consortium of node certificates for simulations.
pub struct Members {
    pub names: Vec<String>,
    certs: BTreeMap<String, Vec<u8>>,
    keys: BTreeMap<String, String>,
}

impl Members {
    /// Issues `n` node certificates (`node-000`, …) from a fresh CA.
    pub fn new(n: usize) -> Result<Self, pki::PkiError> {
        let ca = pki::init_ca("sim", 1)?;
        let mut names = Vec::new();
        let (mut certs, mut keys) = (BTreeMap::new(), BTreeMap::new());
        for i in 0..n {
            let name = format!("node-{i:03}");
            let issued = pki::issue(
                &ca.cert_pem,
                &ca.key_pem,
                &SignSpec { name: &name, role: Role::Node, days: 1, hosts: &[] },
            )?;
            let der =
                keys::cert_der_from_pem(&issued.cert_pem).map_err(|e| pki::PkiError::BadCertificate(e.to_string()))?;
            certs.insert(name.clone(), der);
            keys.insert(name.clone(), issued.key_pem);
            names.push(name);
        }
        names.sort();
        Ok(Self { names, certs, keys })
    }

    fn sign(&self, node: &str, message: &[u8]) -> Vec<u8> {
        keys::sign_message(message, &self.keys[node]).unwrap_or_default()
    }
}

/// Checks signatures against the simulation's certificates (which the test issued itself).
impl PeerVerifier for Members {
    fn verify(&self, node: &str, cert_der: &[u8], message: &[u8], signature: &[u8]) -> Result<(), PeerRefusal> {
        if self.certs.get(node).map(Vec::as_slice) != Some(cert_der) {
            return Err(PeerRefusal::UnknownCertificate);
        }
        Ok(keys::verify_message(message, signature, cert_der)?)
    }
}

/// Everything the coordinator received in a round, by sender.
#[derive(Debug, Default)]
pub struct Transcript {
    pub keys: BTreeMap<u32, RoundKeys>,
    pub shares: BTreeMap<u32, Vec<EncryptedShare>>,
    pub masked_inputs: BTreeMap<u32, Vec<u32>>,
    pub signatures: BTreeMap<u32, Vec<u8>>,
    pub unmask: BTreeMap<u32, Vec<UnmaskShare>>,
}

/// How long each party's work took.
#[derive(Debug, Default)]
pub struct Timings {
    /// Each node's masking time.
    pub masking: Vec<Duration>,
    /// The coordinator's handling of the last unmasking message (share reconstruction and mask
    /// removal).
    pub unmasking: Duration,
}

/// Runs one round among `members` (`params.participants` must be their names). `input(id)` is node `id`'s quantised update; `drop_at[id - 1]` says when it
/// leaves. Records what the coordinator receives when `record` is set.
pub fn run_round(
    members: &Members,
    params: &RoundParams,
    input_len: usize,
    input: &dyn Fn(u32) -> Vec<u32>,
    drop_at: &[DropAt],
    record: bool,
) -> (Result<Outcome, SecAggError>, Transcript, Timings) {
    let mut transcript = Transcript::default();
    let mut timings = Timings::default();
    let now = Instant::now();
    let mut server =
        match Server::new(params.clone(), input_len, Duration::from_secs(60), now + Duration::from_secs(600), now) {
            Ok(s) => s,
            Err(e) => return (Err(e), transcript, timings),
        };
    let leaves = |id: u32, step: DropAt| drop_at.get(id as usize - 1).copied().unwrap_or(DropAt::Never) <= step;
    let mut clients: BTreeMap<u32, Client> = BTreeMap::new();
    let mut queue: VecDeque<ServerAction> = VecDeque::new();
    macro_rules! feed {
        ($r:expr) => {
            match $r {
                Ok(actions) => queue.extend(actions),
                Err(e) => return (Err(e), transcript, timings),
            }
        };
    }
    for name in &members.names {
        let (client, keys) = match Client::new(params.clone(), name) {
            Ok(c) => c,
            Err(e) => return (Err(e), transcript, timings),
        };
        let id = client.id();
        clients.insert(id, client);
        if leaves(id, DropAt::Keys) {
            queue.extend(server.disconnected(name, now));
            continue;
        }
        let signature = members.sign(name, &keys.signed_message());
        if record {
            transcript.keys.insert(id, keys.clone());
        }
        let advertised = AdvertisedKeys { keys, signature, cert_der: members.certs[name].clone() };
        feed!(server.advertise(name, advertised, members, now));
    }
    while let Some(action) = queue.pop_front() {
        match action {
            ServerAction::SendPeers { to, keys } => {
                for id in to {
                    let name = params.name_of(id).unwrap_or_default().to_string();
                    if leaves(id, DropAt::Shares) {
                        queue.extend(server.disconnected(&name, now));
                        continue;
                    }
                    let Some(client) = clients.get_mut(&id) else { continue };
                    let shares = match client.receive_peers(&keys, members) {
                        Ok(s) => s,
                        Err(e) => return (Err(e), transcript, timings),
                    };
                    if record {
                        transcript.shares.insert(id, shares.clone());
                    }
                    feed!(server.shares(&name, shares, now));
                }
            }
            ServerAction::SendShares { u2, per_node } => {
                for &id in &u2 {
                    let name = params.name_of(id).unwrap_or_default().to_string();
                    let Some(client) = clients.get_mut(&id) else { continue };
                    let mine = per_node.get(&id).cloned().unwrap_or_default();
                    if let Err(e) = client.receive_shares(&u2, &mine) {
                        return (Err(e), transcript, timings);
                    }
                    if leaves(id, DropAt::Input) {
                        queue.extend(server.disconnected(&name, now));
                        continue;
                    }
                    let x = input(id);
                    let t0 = Instant::now();
                    let y = match client.masked_input(&x) {
                        Ok(y) => y,
                        Err(e) => return (Err(e), transcript, timings),
                    };
                    timings.masking.push(t0.elapsed());
                    feed!(server.masked_input(&name, &y, now));
                    if record {
                        transcript.masked_inputs.insert(id, y);
                    }
                }
            }
            ServerAction::SendSurvivors { u3 } => {
                for id in u3.clone() {
                    let name = params.name_of(id).unwrap_or_default().to_string();
                    let Some(client) = clients.get_mut(&id) else { continue };
                    let message = match client.receive_survivors(&u3) {
                        Ok(m) => m,
                        Err(e) => return (Err(e), transcript, timings),
                    };
                    if leaves(id, DropAt::Consistency) {
                        queue.extend(server.disconnected(&name, now));
                        continue;
                    }
                    let signature = members.sign(&name, &message);
                    if record {
                        transcript.signatures.insert(id, signature.clone());
                    }
                    feed!(server.consistency(&name, signature, now));
                }
            }
            ServerAction::SendSignatures { to, signatures } => {
                for id in to {
                    let name = params.name_of(id).unwrap_or_default().to_string();
                    let Some(client) = clients.get_mut(&id) else { continue };
                    if leaves(id, DropAt::Unmask) {
                        queue.extend(server.disconnected(&name, now));
                        continue;
                    }
                    let shares = match client.receive_consistency(&signatures, members) {
                        Ok(s) => s,
                        Err(e) => return (Err(e), transcript, timings),
                    };
                    if record {
                        transcript.unmask.insert(id, shares.clone());
                    }
                    let t0 = Instant::now();
                    feed!(server.unmask(&name, shares, now));
                    timings.unmasking = t0.elapsed();
                }
            }
            ServerAction::Done(outcome) => return (Ok(outcome), transcript, timings),
            ServerAction::Failed(reason) => return (Err(SecAggError::Protocol(reason)), transcript, timings),
        }
    }
    (Err(SecAggError::Protocol("the round stalled".into())), transcript, timings)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    use x25519_dalek::{PublicKey, StaticSecret};

    use super::super::masking::{self, Seed, Sign};
    use super::super::{ShareKind, crypto, shamir};
    use super::*;

    fn inputs(seed: u64, len: usize) -> impl Fn(u32) -> Vec<u32> {
        // Small signed integers, like quantised updates: mostly near zero mod 2³².
        move |id| {
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ u64::from(id) << 32);
            (0..len).map(|_| ((rng.next_u32() % 2001) as i32 - 1000) as u32).collect()
        }
    }

    fn sum_of(ids: &BTreeSet<u32>, input: &dyn Fn(u32) -> Vec<u32>, len: usize) -> Vec<u32> {
        let mut s = vec![0u32; len];
        for &id in ids {
            for (a, b) in s.iter_mut().zip(input(id)) {
                *a = a.wrapping_add(b);
            }
        }
        s
    }

    const STEPS: [DropAt; 6] =
        [DropAt::Keys, DropAt::Shares, DropAt::Input, DropAt::Consistency, DropAt::Unmask, DropAt::Never];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Whoever drops at whatever step, the round either completes with exactly the sum of the
        /// nodes whose masked input arrived, or (fewer than t left at some step) fails.
        #[test]
        fn rounds_sum_exactly_the_survivors_or_fail_below_threshold(
            n in 3usize..7,
            drops in proptest::collection::vec(0usize..6, 7),
            never_bias in proptest::collection::vec(any::<bool>(), 7),
            seed in any::<u64>(),
        ) {
            let members = Members::new(n).unwrap();
            let t = n / 2 + 1;
            let drop_at: Vec<DropAt> = (0..n).map(|i| if never_bias[i] { DropAt::Never } else { STEPS[drops[i]] }).collect();
            let len = 37;
            let input = inputs(seed, len);
            let params = RoundParams { plan_id: "plan".into(), round: 1, participants: members.names.clone(), threshold: t };
            let (result, _, _) = run_round(&members, &params, len, &input, &drop_at, false);
            let reach = |step: DropAt| (1..=n as u32).filter(|&id| drop_at[id as usize - 1] > step).collect::<BTreeSet<u32>>();
            let ok = [DropAt::Keys, DropAt::Shares, DropAt::Input, DropAt::Consistency, DropAt::Unmask].iter().all(|&s| reach(s).len() >= t);
            match result {
                Ok(outcome) => {
                    prop_assert!(ok, "completed although fewer than t remained: {drop_at:?}");
                    let survivors = reach(DropAt::Input);
                    prop_assert_eq!(&outcome.survivors, &survivors);
                    prop_assert_eq!(outcome.sum, sum_of(&survivors, &input, len));
                }
                Err(e) => prop_assert!(!ok, "failed although every step kept t nodes: {e} ({drop_at:?})"),
            }
        }

        /// However the coordinator lies about survivors (any lists, any order, repeated), an honest
        /// node never reveals both the self-seed share and the mask-key share of one peer.
        #[test]
        fn an_honest_node_never_answers_for_both_shares_of_one_peer(
            lists in proptest::collection::vec(proptest::collection::btree_set(1u32..6, 1..6), 1..5),
        ) {
            let members = Members::new(5).unwrap();
            let params = RoundParams { plan_id: "p".into(), round: 1, participants: members.names.clone(), threshold: 3 };
            let mut clients: Vec<Client> = Vec::new();
            let mut advertised = Vec::new();
            for name in &members.names {
                let (c, keys) = Client::new(params.clone(), name).unwrap();
                let signature = members.sign(name, &keys.signed_message());
                advertised.push(AdvertisedKeys { keys, signature, cert_der: members.certs[name].clone() });
                clients.push(c);
            }
            let mut all_shares = Vec::new();
            for c in &mut clients {
                all_shares.extend(c.receive_peers(&advertised, &members).unwrap());
            }
            let u2: BTreeSet<u32> = (1..=5).collect();
            let target = &mut clients[0];
            let mine: Vec<EncryptedShare> = all_shares.iter().filter(|s| s.to == 1).cloned().collect();
            target.receive_shares(&u2, &mine).unwrap();
            target.masked_input(&[1, 2, 3]).unwrap();
            let mut revealed: BTreeMap<u32, BTreeSet<ShareKind>> = BTreeMap::new();
            for mut u3 in lists {
                u3.insert(1);
                let message = params.consistency_message(&u3);
                let _ = target.receive_survivors(&u3);
                // The strongest coordinator: real signatures of every listed node on this list.
                let sigs: Vec<(u32, Vec<u8>)> = u3.iter().map(|&id| (id, members.sign(params.name_of(id).unwrap(), &message))).collect();
                if let Ok(shares) = target.receive_consistency(&sigs, &members) {
                    for s in shares {
                        revealed.entry(s.of).or_default().insert(s.kind);
                    }
                }
            }
            for (peer, kinds) in revealed {
                prop_assert!(kinds.len() == 1, "revealed both kinds of share for node {peer}");
            }
        }
    }

    #[test]
    fn the_coordinator_cannot_read_any_single_update_from_what_it_receives() {
        // Node 2 leaves before its masked input, node 4 right after sending it.
        let members = Members::new(5).unwrap();
        let len = 4096;
        let input = inputs(7, len);
        let drop_at = [DropAt::Never, DropAt::Input, DropAt::Never, DropAt::Consistency, DropAt::Never];
        let params =
            RoundParams { plan_id: "plan".into(), round: 3, participants: members.names.clone(), threshold: 3 };
        let (result, seen, _) = run_round(&members, &params, len, &input, &drop_at, true);
        let outcome = result.unwrap();
        let survivors: BTreeSet<u32> = [1, 3, 4, 5].into();
        assert_eq!(outcome.survivors, survivors);
        assert_eq!(outcome.sum, sum_of(&survivors, &input, len), "the aggregate is the survivors' sum");

        // What it holds of each secret: shares of b only for survivors, shares of the mask key only
        // for the node that dropped before its input; never t shares of a survivor's mask key.
        let held =
            |of: u32, kind: ShareKind| seen.unmask.values().flatten().filter(|s| s.of == of && s.kind == kind).count();
        for &u in &survivors {
            assert_eq!(held(u, ShareKind::MaskKey), 0, "a survivor's mask key was revealed");
        }
        assert_eq!(held(2, ShareKind::SelfSeed), 0, "a dropped node's self seed was revealed");

        // Even removing a survivor's self mask (the coordinator learns b for survivors), each masked
        // input stays covered by pairwise masks: it looks uniform and matches the update nowhere.
        for (&u, y) in &seen.masked_inputs {
            let shares: Vec<_> = seen
                .unmask
                .values()
                .flatten()
                .filter(|s| s.of == u && s.kind == ShareKind::SelfSeed)
                .map(|s| s.share.clone())
                .collect();
            let b = super::super::shamir::reconstruct(&shares, 3).unwrap();
            let mut z = y.clone();
            masking::apply(&mut z, &[(b, Sign::Sub)]);
            let x = input(u);
            let equal = z.iter().zip(&x).filter(|(a, b)| a == b).count();
            assert!(equal <= 2, "node {u}: {equal} of {len} words readable");
            // Uniform words have mean |i32| ≈ 2³⁰; the updates are within ±1000.
            let mean_abs = z.iter().map(|w| f64::from(*w as i32).abs()).sum::<f64>() / len as f64;
            assert!(mean_abs > 0.9 * 2f64.powi(30), "node {u}: masked words are not uniform (mean |w| {mean_abs})");
        }
        // Shares travel encrypted: no plaintext share (72 bytes) appears inside the ciphertexts.
        for shares in seen.shares.values() {
            for s in shares {
                assert_eq!(s.ciphertext.len(), 144 + 16);
            }
        }
    }

    #[test]
    fn a_coordinator_that_substitutes_keys_or_replays_them_is_caught() {
        let members = Members::new(3).unwrap();
        let params = RoundParams { plan_id: "p".into(), round: 2, participants: members.names.clone(), threshold: 2 };
        let mut ads = Vec::new();
        let mut clients = Vec::new();
        for name in &members.names {
            let (c, keys) = Client::new(params.clone(), name).unwrap();
            let signature = members.sign(name, &keys.signed_message());
            ads.push(AdvertisedKeys { keys, signature, cert_der: members.certs[name].clone() });
            clients.push(c);
        }
        // The coordinator swaps in its own mask key for node 2.
        let mut forged = ads.clone();
        forged[1].keys.mask_key = [7; 32];
        assert!(matches!(clients[0].receive_peers(&forged, &members), Err(SecAggError::Peer(..))));
        // Keys replayed from another round.
        let (mut fresh, _) = Client::new(RoundParams { round: 3, ..params.clone() }, &members.names[0]).unwrap();
        assert!(fresh.receive_peers(&ads, &members).is_err());
        // A node's keys presented with another node's certificate.
        let mut swapped = ads.clone();
        swapped[1].cert_der = ads[2].cert_der.clone();
        let (mut c, _) = Client::new(params.clone(), &members.names[2]).unwrap();
        assert!(c.receive_peers(&swapped, &members).is_err());
    }

    #[test]
    fn the_coordinator_refuses_malformed_and_out_of_turn_messages_and_goes_on() {
        let members = Members::new(3).unwrap();
        let params = RoundParams { plan_id: "p".into(), round: 1, participants: members.names.clone(), threshold: 2 };
        let now = Instant::now();
        let mut server =
            Server::new(params.clone(), 4, Duration::from_secs(5), now + Duration::from_secs(60), now).unwrap();
        let (_, keys) = Client::new(params.clone(), &members.names[0]).unwrap();
        let signature = members.sign(&members.names[0], &keys.signed_message());
        let ad = AdvertisedKeys { keys, signature, cert_der: members.certs[&members.names[0]].clone() };
        // Presented by another node's connection: refused.
        assert!(server.advertise(&members.names[1], ad.clone(), &members, now).is_err());
        // A masked input before its time: refused.
        assert!(server.masked_input(&members.names[0], &[1, 2, 3, 4], now).is_err());
        assert!(server.advertise("stranger", ad.clone(), &members, now).is_err());
        assert!(server.advertise(&members.names[0], ad.clone(), &members, now).unwrap().is_empty());
        assert!(server.advertise(&members.names[0], ad, &members, now).is_err(), "twice");
        // Only one node advertised by the deadline: below the threshold, the round fails cleanly.
        let actions = server.tick(now + Duration::from_secs(6));
        assert!(
            matches!(&actions[..], [ServerAction::Failed(r)] if r.contains("1 of 3 node(s) advertised keys")),
            "{actions:?}"
        );
    }

    /// The review's attack: a survivor's 2 MiB consistency signature, stored and relayed to
    /// every survivor in one message, pushed that message past the nodes' 2 MiB decode limit. Each
    /// relayed field over its bound is now refused with the field and the limit, and the round
    /// goes on without the node that sent it: the relayed signatures are all within 72 bytes.
    #[test]
    fn oversized_signatures_certificates_and_shares_are_refused_and_the_round_goes_on() {
        use crate::secagg::server::{MAX_CERTIFICATE_BYTES, MAX_SIGNATURE_BYTES, SHARE_CIPHERTEXT_BYTES};
        let members = Members::new(3).unwrap();
        let names = members.names.clone();
        let params = RoundParams { plan_id: "p".into(), round: 1, participants: names.clone(), threshold: 2 };
        let now = Instant::now();
        let step = Duration::from_secs(5);
        let mut server = Server::new(params.clone(), 4, step, now + Duration::from_secs(60), now).unwrap();
        let input = |id: u32| vec![id, 10 * id, 100 * id, 1000 * id];
        let mut clients = BTreeMap::new();
        let mut actions = Vec::new();
        for name in &names {
            let (client, keys) = Client::new(params.clone(), name).unwrap();
            let signature = members.sign(name, &keys.signed_message());
            let ad = AdvertisedKeys { keys, signature, cert_der: members.certs[name].clone() };
            if name == &names[0] {
                let mut big = ad.clone();
                big.signature = vec![0; 2 << 20];
                let e = server.advertise(name, big, &members, now).unwrap_err().to_string();
                assert!(e.contains("signature") && e.contains(&MAX_SIGNATURE_BYTES.to_string()), "{e}");
                let mut big = ad.clone();
                big.cert_der = vec![0; MAX_CERTIFICATE_BYTES + 1];
                let e = server.advertise(name, big, &members, now).unwrap_err().to_string();
                assert!(e.contains("certificate") && e.contains(&MAX_CERTIFICATE_BYTES.to_string()), "{e}");
            }
            actions.extend(server.advertise(name, ad, &members, now).unwrap());
            clients.insert(client.id(), client);
        }
        let Some(ServerAction::SendPeers { keys, .. }) = actions.pop() else { panic!("{actions:?}") };
        for (&id, client) in clients.iter_mut() {
            let shares = client.receive_peers(&keys, &members).unwrap();
            assert!(
                shares.iter().all(|s| s.ciphertext.len() == SHARE_CIPHERTEXT_BYTES),
                "the constant is the real size"
            );
            let name = &names[id as usize - 1];
            if id == 1 {
                for len in [SHARE_CIPHERTEXT_BYTES + 1, SHARE_CIPHERTEXT_BYTES - 1, 2 << 20] {
                    let mut bad = shares.clone();
                    bad[1].ciphertext.resize(len, 0);
                    let e = server.shares(name, bad, now).unwrap_err().to_string();
                    assert!(e.contains(&format!("exactly {SHARE_CIPHERTEXT_BYTES}")), "{e}");
                }
            }
            actions.extend(server.shares(name, shares, now).unwrap());
        }
        let Some(ServerAction::SendShares { u2, per_node }) = actions.pop() else { panic!("{actions:?}") };
        for (&id, client) in clients.iter_mut() {
            client.receive_shares(&u2, &per_node[&id]).unwrap();
            let y = client.masked_input(&input(id)).unwrap();
            actions.extend(server.masked_input(&names[id as usize - 1], &y, now).unwrap());
        }
        let Some(ServerAction::SendSurvivors { u3 }) = actions.pop() else { panic!("{actions:?}") };
        for (&id, client) in clients.iter_mut() {
            let name = &names[id as usize - 1];
            let message = client.receive_survivors(&u3).unwrap();
            if id == 1 {
                // Node 1 sends only a 2 MiB signature: refused; it is not waited for past the step.
                let e = server.consistency(name, vec![0; 2 << 20], now).unwrap_err().to_string();
                assert!(e.contains("consistency signature") && e.contains("at most 72"), "{e}");
                continue;
            }
            actions.extend(server.consistency(name, members.sign(name, &message), now).unwrap());
        }
        actions.extend(server.tick(now + step + Duration::from_secs(1)));
        let Some(ServerAction::SendSignatures { to, signatures }) = actions.pop() else { panic!("{actions:?}") };
        assert_eq!(to, BTreeSet::from([2, 3]));
        assert!(signatures.iter().all(|(_, s)| s.len() <= MAX_SIGNATURE_BYTES));
        for id in to {
            let shares = clients.get_mut(&id).unwrap().receive_consistency(&signatures, &members).unwrap();
            actions.extend(server.unmask(&names[id as usize - 1], shares, now + step).unwrap());
        }
        let Some(ServerAction::Done(outcome)) = actions.pop() else { panic!("{actions:?}") };
        let want: Vec<u32> = (0..4).map(|i| (1..=3).map(|id| input(id)[i]).sum()).collect();
        assert_eq!(outcome.sum, want);
    }

    /// How a node starts its round: [`Client::new`], or the test-only constructor that skips the
    /// majority rule (the code before it).
    type Start = fn(RoundParams, &str) -> Result<(Client, RoundKeys), SecAggError>;

    /// What a coordinator that split the survivor list got out of the nodes.
    #[derive(Debug, Default)]
    struct SplitAttack {
        /// Nodes whose self-mask seed b and mask secret it both rebuilt (the secret checked
        /// against the node's advertised mask key).
        both_secrets: BTreeSet<u32>,
        /// Updates it read in the clear from the masked inputs, by node.
        read: BTreeMap<u32, Vec<u32>>,
        /// Why nodes refused the survivor list or the signatures, by node.
        refused: BTreeMap<u32, SecAggError>,
    }

    /// A malicious coordinator. Keys, shares and masked inputs travel honestly among all the
    /// nodes (U1 = U2 = everyone). Then for each `(told, list)` of `split` it tells the nodes
    /// `told` that the survivors are `list`, gathers their signatures on that list, relays exactly
    /// those to them and keeps every unmasking share they reveal. Last, for every node it tries to
    /// rebuild both b and the mask secret from t shares each, and where it can, strips the self
    /// mask and every pairwise mask from that node's masked input.
    fn split_survivor_attack(
        start: Start,
        members: &Members,
        params: &RoundParams,
        split: &[(BTreeSet<u32>, BTreeSet<u32>)],
        input: &dyn Fn(u32) -> Vec<u32>,
    ) -> Result<SplitAttack, SecAggError> {
        let t = params.threshold;
        let mut clients: BTreeMap<u32, Client> = BTreeMap::new();
        let mut advertised = Vec::new();
        for name in &members.names {
            let (client, keys) = start(params.clone(), name)?;
            let signature = members.sign(name, &keys.signed_message());
            advertised.push(AdvertisedKeys { keys, signature, cert_der: members.certs[name].clone() });
            clients.insert(client.id(), client);
        }
        let mut shares = Vec::new();
        for c in clients.values_mut() {
            shares.extend(c.receive_peers(&advertised, members)?);
        }
        let u2: BTreeSet<u32> = clients.keys().copied().collect();
        let mut masked = BTreeMap::new();
        for (&id, c) in &mut clients {
            let mine: Vec<EncryptedShare> = shares.iter().filter(|s| s.to == id).cloned().collect();
            c.receive_shares(&u2, &mine)?;
            masked.insert(id, c.masked_input(&input(id))?);
        }
        let mut attack = SplitAttack::default();
        let mut revealed: Vec<UnmaskShare> = Vec::new();
        for (told, list) in split {
            let mut signatures = Vec::new();
            for &id in told {
                let (Some(c), Some(name)) = (clients.get_mut(&id), params.name_of(id)) else { continue };
                match c.receive_survivors(list) {
                    Ok(message) => signatures.push((id, members.sign(name, &message))),
                    Err(e) => {
                        attack.refused.insert(id, e);
                    }
                }
            }
            for &(id, _) in &signatures {
                let Some(c) = clients.get_mut(&id) else { continue };
                match c.receive_consistency(&signatures, members) {
                    Ok(s) => revealed.extend(s),
                    Err(e) => {
                        attack.refused.insert(id, e);
                    }
                }
            }
        }
        // Node v's keys are the v-th advertised (ids are positions in the sorted names).
        let mask_key = |v: u32| PublicKey::from(advertised[v as usize - 1].keys.mask_key);
        let context = params.context();
        for &v in &u2 {
            let of = |kind: ShareKind| -> Vec<shamir::Share> {
                revealed.iter().filter(|s| s.of == v && s.kind == kind).map(|s| s.share.clone()).collect()
            };
            let (b_shares, s_shares) = (of(ShareKind::SelfSeed), of(ShareKind::MaskKey));
            if b_shares.len() < t || s_shares.len() < t {
                continue;
            }
            let b = shamir::reconstruct(&b_shares, t)?;
            let secret = StaticSecret::from(shamir::reconstruct(&s_shares, t)?);
            if PublicKey::from(&secret) != mask_key(v) {
                continue;
            }
            attack.both_secrets.insert(v);
            let pairs: Vec<(u32, u32, Seed)> = u2
                .iter()
                .filter(|&&j| j != v)
                .map(|&j| (v, j, masking::pairwise_seed(&secret, &mask_key(j), &context)))
                .collect();
            attack.read.insert(v, masking::unmask(&masked[&v], &[(v, b)], &pairs));
        }
        Ok(attack)
    }

    /// {1, 2} are told the survivors are {1, 2}; {3, 4} that they are {3, 4}; node 5 hears
    /// nothing. Each half signs its own list, so with t = 2 each half has its t signatures.
    fn two_halves() -> Vec<(BTreeSet<u32>, BTreeSet<u32>)> {
        vec![([1, 2].into(), [1, 2].into()), ([3, 4].into(), [3, 4].into())]
    }

    #[test]
    fn without_the_majority_rule_a_split_survivor_list_reads_hospitals_updates() {
        // The attack harness itself, against nodes that accept t = 2 of 5 (the code before the
        // rule): {1, 2} answer with b of 1 and 2 and the mask secrets of 3, 4 and 5, which they
        // were told dropped; {3, 4} with b of 3 and 4 and the mask secrets of 1, 2 and 5.
        let members = Members::new(5).unwrap();
        let params = RoundParams { plan_id: "p".into(), round: 1, participants: members.names.clone(), threshold: 2 };
        let len = 257;
        let input = inputs(11, len);
        let attack =
            split_survivor_attack(Client::new_without_majority_rule, &members, &params, &two_halves(), &input).unwrap();
        assert!(attack.refused.is_empty(), "{:?}", attack.refused);
        assert_eq!(attack.both_secrets, [1, 2, 3, 4].into());
        for v in 1..=4 {
            assert_eq!(attack.read[&v], input(v), "node {v}'s update is read in the clear");
        }
    }

    #[test]
    fn with_the_majority_rule_nodes_refuse_t_2_of_5_and_a_split_survivor_list_gets_nothing() {
        let members = Members::new(5).unwrap();
        let params = RoundParams { plan_id: "p".into(), round: 1, participants: members.names.clone(), threshold: 2 };
        let len = 16;
        let input = inputs(11, len);
        // Every honest node refuses to start the round, naming the rule and what t must be.
        let err = split_survivor_attack(Client::new, &members, &params, &two_halves(), &input).unwrap_err();
        assert_eq!(err, SecAggError::ThresholdNotMajority { t: 2, n: 5, least: 3 });
        let message = err.to_string();
        assert!(message.contains("2t > n") && message.contains("at least 3"), "{message}");
        for name in &members.names {
            assert!(matches!(Client::new(params.clone(), name), Err(SecAggError::ThresholdNotMajority { .. })));
        }
        // Nor does the coordinator's own state machine open such a round.
        let (result, _, _) = run_round(&members, &params, len, &input, &[DropAt::Never; 5], false);
        assert!(matches!(result, Err(SecAggError::ThresholdNotMajority { .. })), "{result:?}");
        // At t = 3 the same split, and the nearest one that could work (three signers on one
        // list, the other list short of node 3, which signed the first), end in refusals.
        let majority = RoundParams { threshold: 3, ..params };
        let near = vec![([1, 2, 3].into(), [1, 2, 3].into()), ([4, 5].into(), [3, 4, 5].into())];
        for split in [two_halves(), near] {
            let attack = split_survivor_attack(Client::new, &members, &majority, &split, &input).unwrap();
            assert!(attack.both_secrets.is_empty() && attack.read.is_empty(), "{split:?}: {attack:?}");
            assert!(attack.refused.values().all(|e| matches!(e, SecAggError::TooFew { .. })), "{attack:?}");
            assert!(!attack.refused.is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// Whichever survivor lists the coordinator shows to whichever nodes, with t a strict
        /// majority it never rebuilds both secrets of any node. Two lists suffice: groups of t
        /// signers on different lists are disjoint, and three would need 3t ≤ n.
        #[test]
        fn no_split_of_the_survivor_list_reveals_both_secrets_of_a_node_under_a_majority(
            n in 3usize..7,
            group in proptest::collection::vec(0usize..3, 7),
            extra in proptest::collection::vec(proptest::collection::btree_set(1u32..7, 0..4), 2),
        ) {
            let members = Members::new(n).unwrap();
            let params = RoundParams { plan_id: "p".into(), round: 1, participants: members.names.clone(), threshold: n / 2 + 1 };
            // Group 0 and group 1 each hear their own list (its members and perhaps others); the
            // rest hear nothing.
            let split: Vec<(BTreeSet<u32>, BTreeSet<u32>)> = (0..2)
                .map(|g| {
                    let told: BTreeSet<u32> = (1..=n as u32).filter(|&id| group[id as usize - 1] == g).collect();
                    let list = told.iter().copied().chain(extra[g].iter().copied().filter(|&id| id <= n as u32)).collect();
                    (told, list)
                })
                .collect();
            let attack = split_survivor_attack(Client::new, &members, &params, &split, &inputs(3, 8)).unwrap();
            prop_assert!(attack.both_secrets.is_empty(), "{split:?}: both secrets of {:?}", attack.both_secrets);
            prop_assert!(attack.read.is_empty());
        }
    }

    #[test]
    fn keys_shares_and_masks_made_under_one_participant_list_or_threshold_fail_under_another() {
        let members = Members::new(5).unwrap();
        let base = RoundParams { plan_id: "p".into(), round: 1, participants: members.names.clone(), threshold: 3 };
        let other_t = RoundParams { threshold: 4, ..base.clone() };
        let other_list = RoundParams { participants: members.names[..4].to_vec(), ..base.clone() };
        let now = Instant::now();
        for announced in [&other_t, &other_list] {
            // The coordinator announced `announced` to node-000 and `base` to the others: same plan,
            // round and (for the first four) ids, but neither side accepts the other's keys.
            let mut clients = Vec::new();
            let mut ads = Vec::new();
            for (i, name) in members.names.iter().enumerate() {
                let params = if i == 0 { announced } else { &base };
                let Ok((c, keys)) = Client::new(params.clone(), name) else { continue };
                let signature = members.sign(name, &keys.signed_message());
                ads.push(AdvertisedKeys { keys, signature, cert_der: members.certs[name].clone() });
                clients.push(c);
            }
            let mut odd = clients.remove(0);
            match odd.receive_peers(&ads, &members) {
                Err(SecAggError::Peer(who, why)) => {
                    assert_eq!(who, members.names[1]);
                    assert!(why.contains("does not verify"), "{why}");
                }
                other => panic!("node-000 accepted keys made under another roster: {other:?}"),
            }
            for c in &mut clients {
                match c.receive_peers(&ads, &members) {
                    Err(SecAggError::Peer(who, why)) => {
                        assert_eq!(who, members.names[0]);
                        assert!(why.contains("does not verify"), "{why}");
                    }
                    other => panic!("node {} accepted node-000's keys: {other:?}", c.id()),
                }
            }
            // The coordinator, opening the round as `base`, refuses them too.
            let mut server =
                Server::new(base.clone(), 4, Duration::from_secs(5), now + Duration::from_secs(60), now).unwrap();
            assert!(matches!(
                server.advertise(&members.names[0], ads[0].clone(), &members, now),
                Err(SecAggError::Peer(..))
            ));
            assert!(server.advertise(&members.names[1], ads[1].clone(), &members, now).is_ok());

            // A share sealed under one roster does not open under the other; the pairwise seeds
            // differ (masks would not cancel); the survivor lists signed differ.
            let ((a, pa), (b, pb)) = (masking::key_pair(), masking::key_pair());
            let sealed = crypto::seal(&a, &pb, &base.context(), 1, 2, b"a share pair").unwrap();
            assert_eq!(crypto::open(&b, &pa, &base.context(), 1, 2, &sealed).unwrap(), b"a share pair");
            assert!(crypto::open(&b, &pa, &announced.context(), 1, 2, &sealed).is_err());
            assert_ne!(
                masking::pairwise_seed(&a, &pb, &base.context()),
                masking::pairwise_seed(&a, &pb, &announced.context())
            );
            let u3: BTreeSet<u32> = [1, 2, 3].into();
            assert_ne!(base.consistency_message(&u3), announced.consistency_message(&u3));
        }
        // Names are length-prefixed: ["ab", "c"] and ["a", "bc"] are different rosters.
        let named = |p: &[&str]| RoundParams {
            participants: p.iter().map(|s| s.to_string()).collect(),
            threshold: 2,
            ..base.clone()
        };
        assert_ne!(named(&["ab", "c"]).roster_digest(), named(&["a", "bc"]).roster_digest());
    }
}
