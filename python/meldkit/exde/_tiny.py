"""A tiny random Stable Video Diffusion pipeline built from configs (nothing downloaded): the
component sizes of diffusers' own fast test. Used by ``meldkit demo``, the ExDe tests and the
examples; needs ``diffusers`` and ``transformers``."""

from __future__ import annotations

import copy

import torch


def unet(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=8,
        projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    ).eval()


def finetuned(base, seed: int = 1, scale: float = 0.05):
    """A copy of ``base`` with every parameter moved (a stand-in for a fine-tune)."""
    out = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(
                scale
                * p.detach().abs().mean().clamp_min(1e-3)
                * torch.randn(p.shape, generator=gen)
            )
    return out


def pipeline(seed: int = 0):
    import diffusers
    import transformers

    torch.manual_seed(seed)
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        trained_betas=None,
        use_karras_sigmas=True,
    )
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
    )
    torch.manual_seed(seed)
    encoder = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            image_size=32,
            intermediate_size=37,
            patch_size=1,
        )
    )
    extractor = transformers.CLIPImageProcessor(crop_size=32, size=32)
    pipe = diffusers.StableVideoDiffusionPipeline(
        vae=vae.eval(),
        image_encoder=encoder.eval(),
        unet=unet(seed),
        scheduler=scheduler,
        feature_extractor=extractor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, steps: int = 6, seed: int = 0, **kwargs):
    """Frames ``[1, F, 3, 32, 32]`` (float tensors) of a 2-frame, 32x32 run from a fixed image."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 32, 32, generator=gen)
    return pipe(
        image,
        height=32,
        width=32,
        num_frames=2,
        decode_chunk_size=2,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        min_guidance_scale=1.0,
        max_guidance_scale=2.5,
        **kwargs,
    ).frames
