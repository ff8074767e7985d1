"""The functional core: what a diffusion is and how it is sampled, as pure functions.

`spec` (DiffusionSpec: the diffusion in the library's own words), `schedules` (betas and their
float64 tables), `timegrid` (where a sampler stops, separate from the training chain),
`diffusion` (q, p, losses, bits/dim), `timestep_sampling` (importance-sampled t), `samplers`
(one step signature, one lax.scan loop) and `guidance` (transforms of the denoiser's output).
Nothing here imports another layer of diffjax.
"""
