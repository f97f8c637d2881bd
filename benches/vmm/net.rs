//! The `net` section: sandbox networking against a lab network namespace
//! the bench makes itself (`tests/common/netlab.rs`: nothing leaves the
//! machine). What a create with egress costs the host, the first request of
//! a fresh sandbox, and TCP throughput both ways through the guest kernel.

use super::*;

#[path = "../../tests/common/netlab.rs"]
#[allow(dead_code)]
mod netlab;

fn spec(egress: bool) -> GuestSpec {
    GuestSpec { template: "default".into(), egress, sandbox_id: String::new(), ram_mib: None, rootfs_gb: None }
}

pub fn bench_net(b: &mut Bench, f: &VmFactory) {
    let lab = netlab::NetLab::start(&[]);
    // A create with egress (a namespace taken and its tap attached) beside
    // one without, server side; each sandbox dropped before the next.
    let n = b.pick(20, 5);
    let mut with = Vec::new();
    let mut without = Vec::new();
    for _ in 0..n {
        for (egress, into) in [(true, &mut with), (false, &mut without)] {
            let t = Instant::now();
            let g = f.create_running(&spec(egress)).expect("create");
            into.push(ms(t.elapsed()));
            drop(g);
        }
        // Lets the namespace thread make the next one, as between creates.
        std::thread::sleep(Duration::from_millis(100));
    }
    b.row(
        "create with egress / without (server side)",
        format!("{:.2} ms / {:.2} ms", median(&with), median(&without)),
        "-",
        "with: a ready namespace taken, its tap attached to the card",
        n,
    );

    // The first request of a fresh sandbox: connect, GET, read.
    let fetch = format!(
        "import time, urllib.request\nt = time.time()\nr = urllib.request.urlopen({:?}, timeout=60).read()\nassert r == b'podflare-lab-ok\\n', r\nprint(time.time() - t)",
        lab.url("/")
    );
    let n = b.pick(5, 2);
    let mut first = Vec::new();
    for _ in 0..n {
        let g = f.create_running(&spec(true)).expect("create");
        let (_, out) = py_out(&g, &fetch, "first request");
        first.push(out.trim().parse::<f64>().unwrap_or(f64::NAN) * 1e3);
    }
    b.row(
        "first HTTP request of a fresh sandbox (urllib, in the guest)",
        format!("{:.0} ms", median(&first)),
        "-",
        "TCP connect, GET, response: every packet through the guest kernel (emulated on PVM)",
        n,
    );

    // Throughput, bytes made in user space on both ends.
    let g = f.create_running(&spec(true)).expect("create");
    let mib = b.knob("PODFLARE_BENCH_NET_MIB", 16, 2);
    let up = format!(
        "import random, socket, time\n_b = random.randbytes({mib} << 20)\ns = socket.create_connection(({:?}, {}))\nt = time.time()\ns.sendall(b'POST /sink HTTP/1.0\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(_b) + _b)\nr = s.recv(4096)\nwhile b'\\r\\n\\r\\n' not in r:\n    r += s.recv(4096)\nprint(time.time() - t)",
        lab.addr().to_string(),
        lab.http_port()
    );
    let (_, out) = py_out(&g, &up, "upload");
    let up_s: f64 = out.trim().parse().unwrap_or(f64::NAN);
    let down = format!(
        "import time, urllib.request\nt = time.time()\nr = urllib.request.urlopen({:?}, timeout=600).read()\nassert len(r) == {} << 20\nprint(time.time() - t)",
        lab.url(&format!("/bytes/{}", mib << 20)),
        mib
    );
    let (_, out) = py_out(&g, &down, "download");
    let down_s: f64 = out.trim().parse().unwrap_or(f64::NAN);
    b.row(
        &format!("TCP guest -> lab server / lab server -> guest, {mib} MiB"),
        format!("{:.1} MiB/s / {:.1} MiB/s", mib as f64 / up_s, mib as f64 / down_s),
        "-",
        &format!("{up_s:.2} s / {down_s:.2} s; one connection, MTU 1500, no offloads"),
        1,
    );
    let c = g.vm().net().counters();
    b.row(
        "frames through the card (that sandbox): sent / received / dropped",
        format!("{} / {} / {}", c.tx_frames, c.rx_frames, c.dropped),
        "-",
        "dropped: malformed or oversized chains, or no room while the guest had no buffer",
        1,
    );
}
