"""The live recall audit through a real Serve app on 127.0.0.1, two router replicas: with every query audited,
/stats and /metrics report exactly the recall@k that the top level over audit_factor x m_1 level-0 candidates,
computed here in process, says the served results kept."""
import re
import time

import numpy as np
import pytest
import requests

from bicascade import models, query
from bicascade.actors.router import RouterConfig
from bicascade.cascade import default_cutoffs
from bicascade.serve.app import AppConfig
from bicascade.storage import cache, tables

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
QUERIES = ["a red circle", "two blue squares side by side", "a small green star above a striped triangle",
           "a large yellow hexagon", "three purple crosses", "an orange ring on grey"]
K = 10


def kept_offline(db_uri: str, queries: list[str], served: dict[str, list[str]]) -> list[float]:
    """The audit's measure in this process: the top level ranks level 0's audit_factor x m_1 best, fresh."""
    db = tables.Database(db_uri)
    infos = query.open_ladder(db, None).levels
    first, last = (models.load_model(infos[j].spec, device="cpu") for j in (0, -1))
    corpus = cache.Corpus(db, infos[0].fingerprint)
    m = RouterConfig.audit_factor * default_cutoffs(len(infos))[0]
    out = []
    for q in queries:
        ids, _ = corpus.search(first.encode_texts([q])[0], m)
        scores = query.encode_stored(last, db, ids) @ last.encode_texts([q])[0]
        truth = {ids[n] for n in np.argsort(-scores, kind="stable")[:K]}
        out.append(len(truth & set(served[q][:K])) / K)
    return out


def test_the_audit_reports_the_recall_the_cutoffs_keep(tiny_db, in_process_server):
    url = in_process_server(AppConfig(db=tiny_db, replicas={"Api": 2}, router={"audit_fraction": 1.0}))
    served = {}
    for q in QUERIES:
        r = requests.post(f"{url}/search", json={"query": q, "k": K}, timeout=120)
        assert r.status_code == 200, r.text
        served[q] = [x["id"] for x in r.json()["results"]]
    shallow = requests.post(f"{url}/search", json={"query": "a red circle", "levels": 1}, timeout=120)
    assert shallow.status_code == 200  # a level-0-only answer has no cutoffs to audit
    deadline = time.monotonic() + 60
    while True:  # audits run off the request path; replicas hand their counts to the hub every second
        audit = requests.get(f"{url}/stats", timeout=30).json()["audit"]
        if audit["queries"] >= len(QUERIES) or time.monotonic() > deadline:
            break
        time.sleep(1)
    want = kept_offline(tiny_db, QUERIES, served)
    assert audit["queries"] == len(QUERIES) and audit["fraction"] == 1.0
    assert audit["recall_kept"] == pytest.approx(np.mean(want), abs=1e-9)
    assert audit["images_encoded"] > 0 and audit["gflops"] > 0  # 200 candidates: more than the cascade cached
    text = requests.get(f"{url}/metrics", timeout=30).text
    value = {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
             for name in ("bicascade_audit_queries_total", "bicascade_audit_recall_kept_total")}
    assert value["bicascade_audit_queries_total"] == len(QUERIES)
    assert value["bicascade_audit_recall_kept_total"] == pytest.approx(sum(want), abs=1e-9)
