//! Hundreds of drivers and riders answering at random, all at once, on one
//! engine: no driver is ever double-booked (see `common::scenario`).

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_driver_is_ever_double_booked_under_concurrent_load() {
    let engine = common::engine(common::scenario::adjust).await;
    common::scenario::no_double_booking(&[engine.local_addr()]).await;
    engine.shutdown().await;
}
