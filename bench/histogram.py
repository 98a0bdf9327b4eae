"""histogram_quantile over one engine's scraped /metrics, shared by the
BENCHMARKS.md writers."""
import re


def quantile(metrics_text, metric, q, labels=""):
    """The q-quantile of `metric`'s buckets, interpolated within a bucket, in
    milliseconds; `labels` selects one series by its labels before `le`
    (`op="acquire",`). None when the histogram is empty. Scrapes of several
    nodes may be concatenated: buckets of the same bound are summed."""
    counts = {}
    for line in metrics_text.splitlines():
        m = re.match(r'%s_bucket\{%sle="([^"]+)"\} (\S+)' % (metric, re.escape(labels)), line)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            counts[le] = counts.get(le, 0.0) + float(m.group(2))
    buckets = sorted(counts.items())
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le * 1000
            span = count - prev_count
            frac = 0 if span == 0 else (rank - prev_count) / span
            return (prev_le + (le - prev_le) * frac) * 1000
        prev_le, prev_count = le, count
    return None
