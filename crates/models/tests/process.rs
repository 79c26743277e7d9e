//! `models::process::init` (its own test binary: it sets an environment variable, which must
//! not race with other tests' threads).

#[test]
fn init_sets_candles_spin_limit_and_keeps_a_users_value() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    std::env::remove_var(VAR);
    models::process::init();
    let want = models::process::CANDLE_SPIN_LIMIT.to_string();
    assert_eq!(std::env::var(VAR).as_deref(), Ok(want.as_str()));
    std::env::set_var(VAR, "7");
    models::process::init();
    assert_eq!(std::env::var(VAR).as_deref(), Ok("7"));
}
