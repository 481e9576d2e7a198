//! Criterion benchmark of the relay's hot path: walking message headers in a stream of
//! DataRows (what every result set costs), against splitting whole frames.

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgvalve::protocol::frame::{split_frame, MessageWalker, Walk};

fn stream(rows: usize) -> BytesMut {
    let mut b = BytesMut::new();
    for i in 0..rows {
        let body = format!("row {i} with some payload of moderate size, like a short text column");
        b.put_u8(b'D');
        b.put_i32(4 + 2 + 4 + body.len() as i32);
        b.put_i16(1);
        b.put_i32(body.len() as i32);
        b.put_slice(body.as_bytes());
    }
    b.put_u8(b'Z');
    b.put_i32(5);
    b.put_u8(b'I');
    b
}

fn bench(c: &mut Criterion) {
    let data = stream(10_000);
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("walker_scan_10k_datarows", |b| {
        b.iter(|| {
            let mut w = MessageWalker::new(1 << 30);
            let mut status = 0u8;
            let n = w
                .scan(
                    &data,
                    |t| t == b'Z',
                    |s, m| {
                        if s.tag == b'Z' {
                            status = m[5];
                        }
                        Walk::Continue
                    },
                )
                .expect("valid stream");
            (n, status)
        })
    });
    g.bench_function("walker_scan_in_16k_reads", |b| {
        b.iter(|| {
            let mut w = MessageWalker::new(1 << 30);
            let mut pending: &[u8] = &[];
            let mut held = Vec::new();
            let mut total = 0;
            for chunk in data.chunks(16 * 1024) {
                held.clear();
                held.extend_from_slice(pending);
                held.extend_from_slice(chunk);
                let n = w
                    .scan(&held, |t| t == b'Z', |_, _| Walk::Continue)
                    .expect("valid stream");
                total += n;
                pending = &[];
                if n < held.len() {
                    // rare: a held-back header; carried into the next read
                    pending = &chunk[chunk.len() - (held.len() - n)..];
                }
            }
            total
        })
    });
    g.bench_function("split_frame_10k_datarows", |b| {
        b.iter_batched(
            || data.clone(),
            |mut buf| {
                let mut n = 0;
                while let Some(f) = split_frame(&mut buf, 1 << 30).expect("valid stream") {
                    n += f.bytes.len();
                }
                n
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
