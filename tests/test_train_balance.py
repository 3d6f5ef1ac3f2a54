"""Loss-free routing balance: node biases move against each step's left/right imbalance; runs resume exactly."""
import pytest
import torch

from dynsparse.lm import DynSparseLMForCausalLM
from dynsparse.train import TrainConfig, train
from dynsparse.train.balance import RoutingBalancer
from dynsparse.train.telemetry import read_jsonl

CORPUS = "".join(f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}.\n" for i in range(300))


def tiny_model():
    cfg = TrainConfig.build("tiny", ff="tree", d_model=16, n_layer=1, n_head=2, depth=2, trees=2, vocab_size=50)
    return DynSparseLMForCausalLM(cfg.model_config(50))


def test_biases_move_against_the_step_imbalance():
    model = tiny_model()
    layer = model.tree_layers()["transformer.h.0.mlp"]
    bal = RoutingBalancer(model, rate=0.01)
    assert layer.tracking
    before = layer.b_in.detach().clone()
    # tree 0: 5 tokens to leaf 3 (right, right), 1 to leaf 0 (left, left); tree 1: 2 to leaf 1, 2 to leaf 2
    layer.leaf_visits += torch.tensor([[1, 0, 0, 5], [0, 2, 2, 0]])
    bal.step()
    delta = ((layer.b_in.detach() - before) / 0.01).round()
    # nodes 0,1,2 internal; 3..6 leaves (their biases route nothing and stay)
    assert delta[0].tolist() == [-1, 1, -1, 0, 0, 0, 0]  # root: 5 right vs 1 left; node 1: 1 left; node 2: 5 right
    assert delta[1].tolist() == [0, -1, 1, 0, 0, 0, 0]  # root balanced; node 1: 2 right; node 2: 2 left
    bal.step()  # nothing routed since: no change
    assert torch.equal(((layer.b_in.detach() - before) / 0.01).round(), delta)


def test_balanced_run_resumes_exactly(tmp_path):
    (tmp_path / "c.txt").write_text(CORPUS)
    cfg = TrainConfig.build("tiny", ff="tree", d_model=32, n_layer=2, n_head=2, depth=3, trees=2, vocab_size=300,
                            seq_len=16, batch_size=4, max_steps=6, warmup_steps=2, eval_every=3, eval_batches=1,
                            ckpt_every=2, log_every=1, telemetry_every=3, data=str(tmp_path / "c.txt"),
                            cache_dir=str(tmp_path / "cache"), tree_balance_rate=0.01)

    def crash(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    full = train(cfg, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, on_step=crash)
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    losses = [[r["loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl")] for run in ("full", "cut")]
    assert losses[0] == losses[1] and resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    plain = train(TrainConfig.from_dict({**cfg.to_dict(), "tree_balance_rate": 0.0}), tmp_path / "plain",
                  progress=False)
    assert plain["val_loss"] != full["val_loss"]  # the balancing did change the training


def test_fsdp_with_balance_is_rejected():
    with pytest.raises(ValueError, match="fsdp"):
        TrainConfig.build("tiny", tree_balance_rate=0.01, fsdp=True)
