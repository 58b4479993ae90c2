//! Identity comes from the certificate: foreign CAs, plaintext and wrong roles are refused, and
//! the coordinator keeps serving the members it should.

use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::{SubmitPlanRequest, SubscribeRequest};
use sanctum_protocol::tls::TlsFiles;
use sanctum_tests::{Consortium, CoordinatorProcess, channel, wait_until};
use std::time::Duration;
use tonic::Code;

async fn subscribe(address: &str, files: &TlsFiles) -> Result<(), String> {
    let ch = channel(address, files).await.map_err(|e| e.to_string())?;
    FederationClient::new(ch)
        .subscribe(SubscribeRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test]
async fn foreign_ca_plaintext_and_wrong_roles_are_refused() {
    let c = Consortium::new();
    let mut coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let node = c.member("cleveland", "node");

    // The member the consortium signed gets in.
    subscribe(&addr, &node).await.expect("a consortium node is served");

    // A node certificate from another CA is refused at the handshake, even when the client
    // trusts our coordinator.
    let other = Consortium::new();
    let foreign = other.member("cleveland", "node");
    let foreign = TlsFiles { ca: c.pki().join("ca.pem"), cert: foreign.cert, key: foreign.key };
    let err = subscribe(&addr, &foreign).await.expect_err("foreign CA must be refused");
    println!("foreign CA: {err}");
    assert!(
        wait_until(Duration::from_secs(5), || coord.log_text().contains("TLS handshake failed")),
        "coordinator log does not show the refused handshake:\n{}",
        coord.log_text()
    );

    // A plaintext client never reaches a handler.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", coord.addr))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    match plain.connect().await {
        Err(e) => println!("plaintext connect refused: {e}"),
        Ok(ch) => {
            let s = FederationClient::new(ch)
                .subscribe(SubscribeRequest::default())
                .await
                .expect_err("plaintext must fail");
            println!("plaintext call refused: {:?} {}", s.code(), s.message());
        }
    }

    // A node certificate cannot call the lead's calls...
    let ch = channel(&addr, &node).await.expect("node channel");
    let s = LeadClient::new(ch)
        .submit_plan(SubmitPlanRequest { plan_toml: String::new(), ..Default::default() })
        .await
        .expect_err("a node must not submit plans");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("'cleveland' holds a node certificate; this call needs role lead"), "{}", s.message());

    // ...an auditor cannot either, and the lead cannot pose as a node.
    let auditor = c.member("auditor-1", "auditor");
    let s = LeadClient::new(channel(&addr, &auditor).await.expect("auditor channel"))
        .submit_plan(SubmitPlanRequest { plan_toml: String::new(), ..Default::default() })
        .await
        .expect_err("an auditor must not submit plans");
    assert_eq!(s.code(), Code::PermissionDenied);
    let err = subscribe(&addr, &c.lead()).await.expect_err("the lead is not a node");
    assert!(err.starts_with("PermissionDenied"), "{err}");

    // After all that the coordinator still serves its members.
    assert!(coord.alive());
    subscribe(&addr, &node).await.expect("still serving");
}
