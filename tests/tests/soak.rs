//! The CI soak: 60 jobs through the real binaries with 2 control-plane
//! kills, 1 Redis restart, clone lock timeouts, failing tasks, duplicated
//! and reordered deliveries (`grs_e2e::soak::SoakOptions::ci`); every
//! invariant must hold. The full soak is `grs-soak` (README, end-to-end
//! proof).
//!
//! Run it with `cargo test -p grs-e2e --test soak -- --ignored --nocapture`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "not in CI yet: one provision entry can be worked by two workers when a live worker's entry is reclaimed on a loaded machine (see README, end-to-end proof); run with --ignored"]
async fn a_small_soak_with_every_fault_mixed_keeps_every_invariant() {
    let opts = grs_e2e::soak::SoakOptions::ci();
    match grs_e2e::soak::run(&opts).await {
        Ok(Some(result)) => {
            eprintln!("{result}");
            assert!(result.ok(), "{:#?}", result.report.problems);
            assert_eq!(result.report.ran_once, opts.jobs);
            assert_eq!(result.control_plane_kills, opts.control_plane_kills);
            assert_eq!(result.redis_restarts, opts.redis_restarts);
        }
        Ok(None) => {}
        Err(e) => panic!("{e:#}"),
    }
}
