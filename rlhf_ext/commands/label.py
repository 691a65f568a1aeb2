"""`rlhf-ext label`: from a policy to a preference file.

rlhf-ext label pairs  --model POLICY --prompts prompts.jsonl --out pairs.jsonl   sample completion pairs
rlhf-ext label serve  --pairs pairs.jsonl --db feedback.sqlite                  people compare them
rlhf-ext label judge  --pairs pairs.jsonl --judge JUDGE --db feedback.sqlite    an AI judge compares them
rlhf-ext label export --db feedback.sqlite --out prefs.jsonl                    rows for `train reward`
"""

import argparse
import os
import sys


def register(subparsers):
    p = subparsers.add_parser(
        "label",
        help="collect preference feedback (pairs, web app, AI judge, export)",
        description=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="label_command", metavar="SUBCOMMAND")
    sub.required = True

    s = sub.add_parser("serve", help="serve the labelling web app")
    s.add_argument("--pairs", help="pairs JSONL (prompt, completion_a, completion_b[, id]) to add to the database")
    s.add_argument("--db", required=True, help="SQLite feedback database (created if missing)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback requires a token")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--k", type=int, default=1, help="labellers asked per item")
    s.add_argument(
        "--token", default=None, help="access token; generated and printed when --host is not a loopback address"
    )
    s.add_argument(
        "--lease-seconds",
        type=float,
        default=600.0,
        help="how long a served item stays reserved for its labeller before others may take it",
    )
    s.set_defaults(func=run_serve)

    g = sub.add_parser("pairs", help="sample completion pairs from a local policy checkpoint")
    g.add_argument("--model", required=True, help="local Hugging Face causal LM folder")
    g.add_argument("--prompts", required=True, help="JSONL with a string 'prompt' per line")
    g.add_argument("--out", required=True, help="pairs JSONL to write")
    g.add_argument("--n", type=int, default=2, help="completions per prompt; every two distinct ones make a pair")
    g.add_argument("--max-new-tokens", type=int, default=64, help="longest completion, in tokens")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    _model_args(g)
    g.set_defaults(func=run_pairs)

    j = sub.add_parser("judge", help="label pairs with a local causal LM judge (written as source='ai')")
    j.add_argument("--pairs", required=True, help="pairs JSONL (also added to the database)")
    j.add_argument("--judge", required=True, help="local Hugging Face causal LM folder of the judge")
    j.add_argument("--db", required=True, help="SQLite feedback database")
    j.add_argument(
        "--template",
        default=None,
        help="file with the judge prompt, containing {prompt}, {response_a} and {response_b}",
    )
    j.add_argument("--answers", default=" A, B", help="the two answer strings, comma-separated (default ' A, B')")
    j.add_argument("--name", default=None, help="labeller name of the judge (default: judge:<folder name>)")
    j.add_argument("--batch-size", type=int, default=4, help="pairs per forward pass (4 sequences each)")
    j.add_argument("--tie-band", type=float, default=0.0, help="vote 'tie' when |P(a better) - 0.5| <= this")
    j.add_argument("--max-length", type=int, default=None, help="skip pairs whose filled template is longer (tokens)")
    j.add_argument("--overwrite", action="store_true", help="re-judge items this judge already voted on")
    _model_args(j)
    j.set_defaults(func=run_judge)

    e = sub.add_parser("export", help="aggregate votes into prompt/chosen/rejected/margin rows")
    e.add_argument("--db", required=True, help="SQLite feedback database")
    e.add_argument("--out", required=True, help="preference JSONL to write")
    e.add_argument(
        "--min-agreement",
        type=float,
        default=0.6,
        help="drop items whose majority label has less than this share of the votes",
    )
    e.add_argument("--source", choices=("human", "ai", "all"), default="human", help="which votes to aggregate")
    e.add_argument(
        "--ties",
        choices=("drop", "keep"),
        default="drop",
        help="drop ties, or keep them as rows with tie=true (RewardTrainer learns equal rewards for them)",
    )
    e.add_argument("--min-votes", type=int, default=1, help="drop items with fewer non-skip votes")
    e.add_argument("--with-meta", action="store_true", help="add item_id, agreement and votes to each row")
    e.set_defaults(func=run_export)


def _model_args(parser):
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights dtype (auto: bfloat16 on a GPU that has it, else float32)",
    )


def _fail(message) -> int:
    print(f"rlhf-ext label: error: {message}", file=sys.stderr)
    return 2


def run_serve(args) -> int:
    try:
        import uvicorn

        from rlhf_ext.label.app import create_app, resolve_token
    except ImportError as err:
        return _fail(f"the web app needs the 'label' extra ({err}); install it with pip install 'rlhf_ext[label]'")
    from rlhf_ext.label.store import FeedbackStore, load_pairs

    if not 1 <= args.port <= 65535:
        return _fail(f"--port must be in 1..65535, got {args.port}")
    if args.k < 1:
        return _fail(f"--k must be at least 1, got {args.k}")
    try:
        token, generated = resolve_token(args.host, args.token)
        store = FeedbackStore(args.db, lease_seconds=args.lease_seconds)
        added = store.add_items(load_pairs(args.pairs)) if args.pairs else 0
        app = create_app(store, k=args.k, host=args.host, token=token)
    except (ValueError, OSError) as err:
        return _fail(err)
    total = len(store.items())
    if total == 0:
        return _fail(f"{args.db} holds no items: pass --pairs")
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"{total} items ({added} new) in {args.db}, {args.k} labeller(s) per item")
    if generated:
        print(f"access token (generated; pass --token to choose one): {token}")
    print(f"open {url}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def run_pairs(args) -> int:
    from rlhf_ext.label._hf import load_causal_lm
    from rlhf_ext.label.pairs import load_prompts, make_pairs, sample_completions, write_jsonl

    try:
        prompts = load_prompts(args.prompts)
        model, tokenizer = load_causal_lm(args.model, device=args.device, dtype=args.dtype)
        completions = sample_completions(
            model,
            tokenizer,
            prompts,
            n=args.n,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    except (ValueError, OSError, RuntimeError) as err:
        return _fail(err)
    rows, skipped = make_pairs(prompts, completions, model_name=os.path.basename(os.path.normpath(args.model)))
    write_jsonl(rows, args.out)
    print(
        f"{len(rows)} pairs from {len(prompts)} prompts x {args.n} samples -> {args.out}"
        + (f" ({skipped} identical, empty or repeated pairs skipped)" if skipped else "")
    )
    return 0


def run_judge(args) -> int:
    from rlhf_ext.label._hf import load_causal_lm
    from rlhf_ext.label.judge import DEFAULT_TEMPLATE, check_template, judge_pairs
    from rlhf_ext.label.store import FeedbackStore, load_pairs

    answers = tuple(args.answers.split(","))
    name = args.name or "judge:" + os.path.basename(os.path.normpath(args.judge))
    try:
        template = DEFAULT_TEMPLATE
        if args.template:
            with open(args.template, encoding="utf-8") as f:
                template = check_template(f.read())
        store = FeedbackStore(args.db)
        items = load_pairs(args.pairs)
        store.add_items(items)
        if not args.overwrite:
            done = {v["item_id"] for v in store.votes("ai") if v["labeller"] == name}
            items = [item for item in items if item["id"] not in done]
        model, tokenizer = load_causal_lm(args.judge, device=args.device, dtype=args.dtype)
        counts = {"a": 0, "b": 0, "tie": 0, "too_long": 0, "orders_disagree": 0}
        bias = []
        for item, verdict in judge_pairs(
            model,
            tokenizer,
            items,
            template=template,
            answers=answers,
            batch_size=args.batch_size,
            tie_band=args.tie_band,
            max_length=args.max_length,
        ):
            if verdict is None:
                counts["too_long"] += 1
                continue
            counts[verdict["choice"]] += 1
            counts["orders_disagree"] += not verdict["orders_agree"]
            bias.append(verdict["position_bias"])
            meta = {k: verdict[k] for k in ("p_a", "logodds_a_first", "logodds_b_first", "position_bias")}
            store.record_ai_vote(
                item["id"], name, verdict["choice"], verdict["confidence"], meta=meta, overwrite=args.overwrite
            )
    except (ValueError, OSError, RuntimeError) as err:
        return _fail(err)
    judged = counts["a"] + counts["b"] + counts["tie"]
    print(f"{name}: judged {judged} pairs (a {counts['a']}, b {counts['b']}, tie {counts['tie']}) -> {args.db}")
    if bias:
        print(
            f"mean position bias {sum(bias) / len(bias):+.3f} log-odds towards the first slot (cancelled); "
            f"the two orders disagreed on {counts['orders_disagree']} pairs"
        )
    if counts["too_long"]:
        print(f"skipped {counts['too_long']} pairs longer than --max-length {args.max_length}")
    return 0


def run_export(args) -> int:
    from rlhf_ext.label.export import export, format_summary
    from rlhf_ext.label.store import FeedbackStore

    if not os.path.exists(args.db):
        return _fail(f"--db {args.db!r} does not exist")
    try:
        summary = export(
            FeedbackStore(args.db),
            args.out,
            source=args.source,
            min_agreement=args.min_agreement,
            ties=args.ties,
            min_votes=args.min_votes,
            with_meta=args.with_meta,
        )
    except (ValueError, OSError) as err:
        return _fail(err)
    print(format_summary(summary, args.out))
    return 0
