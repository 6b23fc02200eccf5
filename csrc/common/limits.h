// Limits shared by the kernels, the checks and build_info.
#pragma once

// Largest head dim cache_attention and rope support (Llama-family heads are 64 or 128; Gemma uses 256).
#define LAYERSKIP_MAX_HEAD_DIM 256
