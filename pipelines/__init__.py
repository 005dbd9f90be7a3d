"""Jobs over a corpus, by concern: `ingest` (sources and the index job: the production path), `measure`
(evaluation, the stream simulator, reports), `lab` (the synthetic world and ladder training), and the demo."""
