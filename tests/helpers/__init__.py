"""What the tests share, one module a subject (fixtures built from these are in tests/conftest.py):

    cli.py             the CLI in this process: compose_cfg, cli_main, fail, prepared, engine_for; trainer settings
    processes.py       real processes: run_cli, start, accelerate_launch, kill_and_resume, scores
    data.py            toy data sets and their files: make_sentences, write_sentiment_csv, make_ner, lm_corpus, jsonl
    models.py          tiny random models: build_tiny_bert, tiny_variant, build_tiny_lm
    seq2seq_models.py  tiny T5 / BART / mBART-50 / BERT2BERT / decoder-only translators and their parallel corpus
    sweeps.py          sweep trials: their records, hand-made ones, the config one trial sees
    fake_hub.py        a Hugging Face Hub stand-in on 127.0.0.1 for push tests
"""
