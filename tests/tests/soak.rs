//! The CI soak: 60 jobs through the real binaries with 2 control-plane
//! kills, 1 Redis restart, clone lock timeouts, failing tasks, duplicated
//! and reordered deliveries (`grs_e2e::soak::SoakOptions::ci`); every
//! invariant must hold. The full soak is `grs-soak` (README, end-to-end
//! proof).
//!
//! It runs in CI (`cargo test -p grs-e2e --test soak -- --nocapture` shows
//! its report); a passing run took 16-22 s on a loaded 2-core machine
//! (README, the soak).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
