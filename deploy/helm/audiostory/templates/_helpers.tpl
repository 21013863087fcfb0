{{- define "audiostory.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "audiostory.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "audiostory.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: triton
{{- end -}}

{{/* The repository settings: the user's, plus the remote LLM tier's URLs when disaggregated. */}}
{{- define "audiostory.settings" -}}
{{- $s := deepCopy .Values.settings -}}
{{- if .Values.disaggregated.enabled -}}
{{- $name := include "audiostory.fullname" . -}}
{{- $eo := dict
      "generate_url" (printf "http://%s-vllm-generate:%v" $name .Values.disaggregated.generate.port)
      "pooling_url" (printf "http://%s-vllm-pooling:%v" $name .Values.disaggregated.pooling.port)
      "remote_model" .Values.disaggregated.servedModelName
      "remote_timeout_s" .Values.disaggregated.timeoutSeconds
      "remote_retries" .Values.disaggregated.retries -}}
{{- $_ := set $s "engine_options" (merge $eo (default dict $s.engine_options)) -}}
{{- end -}}
{{- toJson $s -}}
{{- end -}}
