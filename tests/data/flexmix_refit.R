# Reference standard errors from R flexmix refit() for moelab's tests (issue 15).
# Run: Rscript flexmix_refit.R DATA.csv OUT.csv  (DATA.csv: x, y, post1, post2 = moelab's posterior at its fit)
# Model: y ~ x in each of 2 Gaussian experts, gate multinom(~ x) (concomitant = FLXPmultinom(~ x)),
# started from moelab's posterior (cluster =), so flexmix's EM converges to the same optimum.
suppressPackageStartupMessages(library(flexmix))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
post <- as.matrix(d[, c("post1", "post2")])
set.seed(1)
fit <- flexmix(y ~ x, data = d, k = 2, cluster = post, model = FLXMRglm(family = "gaussian"),
               concomitant = FLXPmultinom(~ x), control = list(tol = 1e-12, iter.max = 5000, minprior = 0))
rf <- refit(fit, method = "optim")  # optim on the full log-likelihood from the EM fit; Hessian -> vcov
out <- data.frame(name = names(rf@coef), estimate = unname(rf@coef), se = unname(sqrt(diag(rf@vcov))))
out$em_loglik <- as.numeric(logLik(fit))  # flexmix's EM (sigma with a df correction), before refit's optim
out$flexmix <- as.character(packageVersion("flexmix"))
out$R <- paste(R.version$major, R.version$minor, sep = ".")
print(out)
write.csv(out, args[2], row.names = FALSE)
