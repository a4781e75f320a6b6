# Runs meteoritsSim::emNMoE on the fits listed in a job table and times each
# call from inside R (proc.time around the call: Rscript start-up, package
# loading and data reading are not counted). Driven by crpe_sgame.py; not a test.
#
#   Rscript emnmoe_fits.R JOBS.csv OUT.csv LIB MAX_ITER THRESHOLD OVERHEAD_REPEATS
#
# JOBS.csv columns: id, K, n, seed, file (n doubles x then n doubles y, little
# endian). The true parameters (softmax-2023 design) are fixed below.
#
# Starts: emNMoE's own near-truth start (nearTrue = TRUE, as in the authors'
# CRPE-SGaME experiments) adds random noise to the values it is given, so the
# start is drawn here first, with set.seed(seed), by the very method emNMoE
# calls (ParamNMoE$initParam), and recorded; then set.seed(seed) again and
# emNMoE draws the same start as its first use of the RNG. The first entry of
# its log-likelihood trace is the log-likelihood at that start, which the
# Python side checks against moelab's at the recorded start.

args <- commandArgs(trailingOnly = TRUE)
jobs_file <- args[1]
out_file <- args[2]
lib <- args[3]
max_iter <- as.integer(args[4])   # emNMoE runs up to max_iter + 1 M-steps
threshold <- as.numeric(args[5])
overhead_repeats <- as.integer(args[6])

suppressPackageStartupMessages(library(meteoritsSim, lib.loc = lib))

# truth, in meteoritsSim's layout: rows (intercept, slope); gate columns are the
# K* - 1 non-reference experts plus the zero reference; sigmak_0 holds variances
alphak_0 <- matrix(c(-8, 25, 0, 0), 2, 2)
betak_0 <- matrix(c(15, -20, -5, 20), 2, 2)
sigmak_0 <- matrix(c(0.3^2, 0.4^2), 1, 2)

cpu <- function(t) t[["user.self"]] + t[["sys.self"]]
flat <- function(v) paste(sprintf("%.17g", as.vector(v)), collapse = ";")

fit_one <- function(x, y, K, seed, max_it) {
  set.seed(seed)
  t0 <- proc.time()
  m <- emNMoE(X = x, Y = y, K = K, p = 1, q = 1, n_tries = 1, max_iter = max_it,
              threshold = threshold, nearTrue = TRUE,
              alphak_0 = alphak_0, betak_0 = betak_0, sigmak_0 = sigmak_0)
  t1 <- proc.time()
  list(model = m, cpu = cpu(t1 - t0), wall = (t1 - t0)[["elapsed"]])
}

# warm-up: R byte-compiles closures on their first calls
set.seed(1)
xw <- seq(0, 1, length.out = 500)
yw <- ifelse(runif(500) < 1 / (1 + exp(8 - 25 * xw)), 15 - 20 * xw + 0.3 * rnorm(500), -5 + 20 * xw + 0.4 * rnorm(500))
invisible(fit_one(xw, yw, 2, 1, 5))
invisible(fit_one(xw, yw, 3, 1, 5))

# per-call overhead: one EM iteration (max_iter = 0) on n = 100
xo <- xw[seq(1, 500, by = 5)]
yo <- yw[seq(1, 500, by = 5)]
oh <- sapply(seq_len(overhead_repeats), function(i) fit_one(xo, yo, 2, i, 0)$cpu)

jobs <- read.csv(jobs_file, stringsAsFactors = FALSE)
rows <- vector("list", nrow(jobs))
for (j in seq_len(nrow(jobs))) {
  jb <- jobs[j, ]
  con <- file(jb$file, "rb")
  x <- readBin(con, "double", jb$n, size = 8, endian = "little")
  y <- readBin(con, "double", jb$n, size = 8, endian = "little")
  close(con)
  # the start emNMoE will draw (same method, same RNG state)
  set.seed(jb$seed)
  p0 <- meteoritsSim:::ParamNMoE(X = x, Y = y, K = jb$K, p = 1, q = 1)
  p0$initParam(segmental = FALSE, TRUE, alphak_0, betak_0, sigmak_0)
  r <- fit_one(x, y, jb$K, jb$seed, max_iter)
  m <- r$model
  # log-likelihood at the returned parameters (emNMoE's reported loglik is the
  # one computed in the E-step of its last iteration, before that M-step)
  st <- meteoritsSim:::StatNMoE(paramNMoE = m$param)
  st$EStep(m$param)
  ll_returned <- sum(st$log_sum_piik_fik)
  rows[[j]] <- data.frame(
    id = jb$id, cpu = r$cpu, wall = r$wall, iters = length(m$stat$stored_loglik),
    loglik_reported = sprintf("%.17g", m$stat$loglik), loglik_start = sprintf("%.17g", m$stat$stored_loglik[1]),
    loglik_returned = sprintf("%.17g", ll_returned),
    start_alpha = flat(p0$alpha), start_beta = flat(p0$beta), start_sigma2 = flat(p0$sigma2),
    alpha = flat(m$param$alpha), beta = flat(m$param$beta), sigma2 = flat(m$param$sigma2),
    stringsAsFactors = FALSE)
  cat(sprintf("  R  id %d  K=%d n=%d: %.3f CPU-s, %d iterations\n", jb$id, jb$K, jb$n, r$cpu, length(m$stat$stored_loglik)),
      file = stderr())
}
res <- do.call(rbind, rows)
write.csv(res, out_file, row.names = FALSE)
write.csv(data.frame(overhead_cpu = oh), paste0(out_file, ".overhead.csv"), row.names = FALSE)
