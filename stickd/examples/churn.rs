//! A bounded write load for memory measurements: `Store` calls at a steady rate into one table
//! over a node's unix socket, with a `Watch` stream kept open as proxyd's would be.
//!
//! `churn SOCKET TABLE RATE SECONDS KEYS [fresh] [BATCH]`: RATE items per second (fractions
//! allowed) in batches of BATCH (default 100) for SECONDS, keys drawn from KEYS names (or, with
//! `fresh`, never the same key twice, as new sessions are), servers app1..app4. Prints a line
//! every 10 s with the node's Stats. Keys start with `$CHURN_PREFIX` (default `sess`), so that
//! writers on several nodes use distinct keys.

use std::time::{Duration, Instant};

use proto::stick::v1 as pb;
use proto::stick::v1::stick_client::StickClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        return Err("usage: churn SOCKET TABLE RATE SECONDS KEYS [fresh] [BATCH]".into());
    }
    let socket = std::path::PathBuf::from(&args[1]);
    let table = args[2].clone();
    let rate: f64 = args[3].parse()?;
    let secs: u64 = args[4].parse()?;
    let keys: u64 = args[5].parse()?;
    let fresh = args.get(6).is_some_and(|a| a == "fresh");
    let batch: usize = args.get(7).map_or(Ok(100), |b| b.parse())?;
    // Writers on several nodes use distinct keys.
    let prefix = std::env::var("CHURN_PREFIX").unwrap_or_else(|_| "sess".into());

    let ch = common::grpc::connect_unix(&socket).await?;
    let mut c = StickClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);

    // A watcher that drains every change, as a proxyd worker does.
    let mut w = c.clone();
    let wt = table.clone();
    tokio::spawn(async move {
        let Ok(s) = w.watch(pb::WatchRequest { tables: vec![wt] }).await else {
            return;
        };
        let mut s = s.into_inner();
        while let Ok(Some(_)) = s.message().await {}
        eprintln!("churn: watch ended");
    });

    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let every = Duration::from_secs_f64(batch as f64 / rate);
    let mut next = Instant::now();
    let mut sent = 0u64;
    let mut report = start + Duration::from_secs(10);
    while Instant::now() < end {
        let items = (0..batch as u64)
            .map(|i| {
                let n = sent + i;
                let k = if fresh { n } else { n % keys };
                pb::StoreItem {
                    key: format!("{prefix}-{k:012}"),
                    server: format!("app{}", n % 4 + 1),
                    expires_unix_ms: 0,
                }
            })
            .collect();
        c.store(pb::StoreRequest {
            table: table.clone(),
            items,
            omit_entries: false,
            watcher: 0,
            batch: 0,
        })
        .await?;
        sent += batch as u64;
        next += every;
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        } else if now - next > Duration::from_secs(1) {
            // Behind by more than a second: do not burst to catch up.
            next = now;
        }
        if now >= report {
            report += Duration::from_secs(10);
            let s = c.stats(pb::StatsRequest {}).await?.into_inner();
            println!(
                "t={:.0}s sent={sent} head={} first={} log={}",
                start.elapsed().as_secs_f64(),
                s.head_seq,
                s.log_first_seq,
                s.head_seq + 1 - s.log_first_seq
            );
        }
    }
    println!("done: sent {sent} in {:.0}s", start.elapsed().as_secs_f64());
    Ok(())
}
