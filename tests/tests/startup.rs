//! Bad configuration and unreachable services stop `llmq` at startup with a message
//! naming what is wrong and what to do, and without printing secrets.

use std::process::Output;

use llmq_tests::TestApp;

async fn llmq(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(TestApp::llmq_binary().unwrap());
    cmd.args(args).env("RUST_LOG", "off");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.unwrap()
}

#[tokio::test]
async fn invalid_setting_names_the_field_and_variable() {
    let out = llmq(&["worker"], &[("LLMQ_WORKER__CONCURRENCY", "0")]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("worker.concurrency") && err.contains("LLMQ_WORKER__CONCURRENCY"),
        "{err}"
    );

    let out = llmq(
        &["api"],
        &[("LLMQ_PROVIDERS__OPENAI__BASE_URL", "not a url")],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("providers.openai.base_url"), "{err}");

    let out = llmq(&["worker"], &[("LLMQ_WORKER__CONCURRENCY", "many")]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker.concurrency"), "{err}");
}

#[tokio::test]
async fn unreachable_database_is_a_clear_error_without_the_password() {
    let out = llmq(
        &["migrate"],
        &[(
            "LLMQ_DATABASE_URL",
            "postgres://llmq:hunter2secret@127.0.0.1:1/llmq",
        )],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to PostgreSQL") && err.contains("scripts/services.sh"),
        "{err}"
    );
    assert!(!err.contains("hunter2secret"), "password leaked: {err}");
}
