"""Nodes that give distilled models the sampling schedules they were distilled for."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..pso import families, schedules


class PSOFewStepSigmas(io.ComfyNode):
    """The exact few-step timestep set a distilled model was trained on, as SIGMAS."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        flow = families.flow_presets()
        names = list(schedules.FEW_STEP_TIMESTEPS) + list(flow)  # flow presets appended: old values keep
        return io.Schema(
            node_id="PSOFewStepSigmas",
            display_name="PSO Few-Step Sigmas",
            category="PSO/sampling",
            description=(
                "SIGMAS for the discrete timesteps a distilled model was trained on (for example "
                "DMD2's 999/749/499/249), mapped through the model's own noise schedule. Feed it to "
                "SamplerCustomAdvanced, and use the same SIGMAS for PSO reference sampling so training "
                "sees exactly the steps you sample with."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The distilled diffusion model whose noise schedule maps timesteps to sigmas.",
                ),
                io.Combo.Input(
                    "schedule",
                    options=names,
                    default="dmd2" if "dmd2" in names else names[0],
                    tooltip="Which distilled model's timestep set to use: "
                    + "; ".join(f"{k}: {list(v)}" for k, v in schedules.FEW_STEP_TIMESTEPS.items())
                    + ". Flow models (FLUX.1-schnell, Z-Image-Turbo, Qwen-Image-Lightning, SD3.5 Large "
                    "Turbo, Wan 2.2 Lightning): "
                    + "; ".join(f"{k}: {p.steps} steps ({p.source})" for k, (p, _) in flow.items()),
                ),
            ],
            outputs=[
                io.Sigmas.Output(
                    tooltip="Decreasing noise levels, one per sampling step, ending in 0 (ComfyUI SIGMAS)."
                )
            ],
        )

    @classmethod
    def execute(cls, model, schedule) -> io.NodeOutput:
        ms = model.get_model_object("model_sampling")
        flow = families.flow_presets()
        if schedule in flow:
            preset, made_for = flow[schedule]
            if not schedules.is_rectified_flow(ms):
                raise ValueError(
                    f"PSO Few-Step Sigmas: schedule {schedule!r} is for rectified-flow models "
                    f"({', '.join(made_for)}); this model is a discrete-timestep model: choose one of "
                    f"{sorted(schedules.FEW_STEP_TIMESTEPS)}")
            return io.NodeOutput(schedules.simple_sigmas(ms, preset.steps))
        if schedules.is_rectified_flow(ms):
            raise ValueError(
                f"PSO Few-Step Sigmas: schedule {schedule!r} lists discrete DDPM timesteps, but this model "
                "is a rectified-flow model (e.g. FLUX.1-schnell); choose one of its flow schedules "
                f"({sorted(families.flow_presets())}), or BasicScheduler with the 'simple' scheduler"
            )
        return io.NodeOutput(schedules.few_step_sigmas(ms, schedule))
